#!/usr/bin/env bash
# Sets up what the end-to-end tests need on this host, idempotently:
#   - a Docker registry on 127.0.0.1:5000 (no auth),
#   - a Docker registry on 127.0.0.1:5001 with basic auth (deployer / s3cret),
#   - the test images (tests/images/build.sh), pushed to both,
#   - removes containers/networks/volumes left by test processes that died.
# Registries already answering are left alone. Storage, configs and logs live
# under $TEST_ENV_DIR (default /var/tmp/deploy-agent-test).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TEST_ENV_DIR="${TEST_ENV_DIR:-/var/tmp/deploy-agent-test}"
REGISTRY_BIN="${REGISTRY_BIN:-$(command -v docker-registry || true)}"

die() { echo "scripts/test-env.sh: $*" >&2; exit 1; }

command -v docker >/dev/null || die "docker CLI not found: apt-get install docker.io"
docker info >/dev/null 2>&1 || die "the Docker daemon does not answer (docker info failed): start it, e.g. 'dockerd >/var/log/dockerd.log 2>&1 &'"
[ -n "$REGISTRY_BIN" ] || die "docker-registry not found: apt-get install docker-registry"
command -v curl >/dev/null || die "curl not found: apt-get install curl"

mkdir -p "$TEST_ENV_DIR"

# registry_status PORT -> prints the HTTP status of GET /v2/ (000 when nothing answers)
registry_status() {
    curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$1/v2/" || true
}

# start_registry PORT EXPECTED_STATUS [htpasswd-file]
start_registry() {
    local port="$1" expect="$2" htpasswd="${3:-}"
    local status
    status="$(registry_status "$port")"
    if [ "$status" = "$expect" ]; then
        echo "registry on 127.0.0.1:$port is up"
        return
    fi
    [ "$status" = 000 ] || die "something else answers on 127.0.0.1:$port (GET /v2/ -> $status, expected $expect)"
    local dir="$TEST_ENV_DIR/registry-$port"
    mkdir -p "$dir/storage"
    {
        echo "version: 0.1"
        echo "log:"
        echo "  level: warn"
        echo "  accesslog:"
        echo "    disabled: true"
        echo "storage:"
        echo "  filesystem:"
        echo "    rootdirectory: $dir/storage"
        echo "  delete:"
        echo "    enabled: true"
        echo "http:"
        echo "  addr: 127.0.0.1:$port"
        echo "  secret: deploy-agent-test-$port"
        if [ -n "$htpasswd" ]; then
            cp "$htpasswd" "$dir/htpasswd"
            echo "auth:"
            echo "  htpasswd:"
            echo "    realm: deploy-agent-test"
            echo "    path: $dir/htpasswd"
        fi
    } >"$dir/config.yml"
    setsid nohup "$REGISTRY_BIN" serve "$dir/config.yml" >"$dir/registry.log" 2>&1 </dev/null &
    echo $! >"$dir/pid"
    for _ in $(seq 1 100); do
        status="$(registry_status "$port")"
        if [ "$status" = "$expect" ]; then
            echo "started registry on 127.0.0.1:$port (pid $(cat "$dir/pid"), log $dir/registry.log)"
            return
        fi
        sleep 0.1
    done
    cat "$dir/registry.log" >&2 || true
    die "registry on 127.0.0.1:$port did not come up (GET /v2/ -> $status, expected $expect)"
}

start_registry 5000 200
start_registry 5001 401 "$ROOT/tests/images/registry-htpasswd"

# Containers, networks and volumes of test harnesses whose process is gone.
# Test instances are named t<pid>n<suffix> (see tests/src/lib.rs).
cleanup_stale() {
    local label=io.deploy-agent.instance kind ids inst pid
    for inst in $( (docker ps -a --filter "label=$label" --format "{{.Label \"$label\"}}"
        docker network ls --filter "label=$label" --format "{{.Label \"$label\"}}"
        docker volume ls --filter "label=$label" --format "{{.Label \"$label\"}}") | sort -u); do
        [[ "$inst" =~ ^t([0-9]+)n[0-9a-z]+$ ]] || continue
        pid="${BASH_REMATCH[1]}"
        [ -d "/proc/$pid" ] && continue
        echo "removing leftovers of test instance $inst"
        ids="$(docker ps -aq --filter "label=$label=$inst")"
        [ -z "$ids" ] || docker rm -f $ids >/dev/null || true
        ids="$(docker network ls -q --filter "label=$label=$inst")"
        [ -z "$ids" ] || docker network rm $ids >/dev/null || true
        ids="$(docker volume ls -q --filter "label=$label=$inst")"
        [ -z "$ids" ] || docker volume rm -f $ids >/dev/null || true
    done
}
cleanup_stale

bash "$ROOT/tests/images/build.sh"
