#!/usr/bin/env bash
# The whole story on this host, in one command:
#   builds everything, starts a local registry and builds demo images v1, v2
#   and a broken v3, starts the agent (proxy + daemon), deploys v1, rolls to v2
#   while a load loop runs, tries v3 (refused by the health gate: v2 keeps
#   serving), runs `deploy-agent rollback` (v1 is back), and prints what
#   happened with the number of failed requests.
#
#   scripts/demo.sh            # serves on 127.0.0.1:8080 (DEMO_PORT to change)
#   KEEP=1 scripts/demo.sh     # leave the agent and the containers running
#
# Builds into CARGO_TARGET_DIR (or cargo's build.target-dir) when set. At the
# end it says what it leaves behind (the test registries and images that
# scripts/test-env.sh starts and builds, which scripts/test.sh reuses) and
# how to remove it.
#
# Needs Docker, docker-registry, curl, busybox-static and cargo (see
# scripts/prerequisites.sh).
set -euo pipefail

# A relative CARGO_TARGET_DIR means the caller's directory, not the checkout's.
if [ -n "${CARGO_TARGET_DIR:-}" ] && [[ "$CARGO_TARGET_DIR" != /* ]]; then
    export CARGO_TARGET_DIR="$PWD/$CARGO_TARGET_DIR"
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TEST_ENV_DIR="${TEST_ENV_DIR:-/var/tmp/deploy-agent-test}"
PORT="${DEMO_PORT:-8080}"
KEEP="${KEEP:-0}"
PROJECT=demo
INSTANCE=demo

if [ -t 1 ]; then B=$'\033[1m'; N=$'\033[0m'; else B=""; N=""; fi
step() { printf '\n%s==> %s%s\n' "$B" "$*" "$N"; }
die() { echo "scripts/demo.sh: $*" >&2; exit 1; }

command -v docker >/dev/null || die "docker not found (apt-get install docker.io)"
command -v cargo >/dev/null || die "cargo not found: install the Rust toolchain (rustup)"
docker info >/dev/null 2>&1 || die "the Docker daemon does not answer: start it (dockerd &)"
if curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$PORT/"; then
    die "something already answers on 127.0.0.1:$PORT: set DEMO_PORT to a free port"
fi

step "Build (cargo build)"
cargo build -p deploy-agent -p deploy-testkit --bins
TARGET_DIR="$(cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
[ -d "$TARGET_DIR" ] || die "cannot tell cargo's target directory (cargo metadata: '$TARGET_DIR')"
AGENT="$TARGET_DIR/debug/deploy-agent"
LOADGEN="$TARGET_DIR/debug/deploy-load"
[ -x "$AGENT" ] && [ -x "$LOADGEN" ] || die "$AGENT or $LOADGEN is missing after cargo build"

step "Local registry on 127.0.0.1:5000 and demo images v1, v2, v3 (broken)"
bash scripts/test-env.sh

DEMO_DIR="$(mktemp -d /tmp/deploy-demo.XXXXXX)"
export DEPLOY_AGENT_STATE_DIR="$DEMO_DIR/state"
export DEPLOY_AGENT_CONFIG="$DEMO_DIR/agent.toml"
mkdir -p "$DEPLOY_AGENT_STATE_DIR"
# A short observation window (production default: 5m) keeps the demo brisk:
# after each switch the agent still watches the new release for 5 s, with
# the previous one warm, before it commits.
printf 'instance = "%s"\nobserve_window = "5s"\n' "$INSTANCE" >"$DEPLOY_AGENT_CONFIG"

remove_containers() {
    local ids
    ids="$(docker ps -aq --filter "label=io.deploy-agent.instance=$INSTANCE")"
    [ -z "$ids" ] || docker rm -f $ids >/dev/null 2>&1 || true
    ids="$(docker network ls -q --filter "label=io.deploy-agent.instance=$INSTANCE")"
    [ -z "$ids" ] || docker network rm $ids >/dev/null 2>&1 || true
}
# What the demo leaves behind, and how to remove it.
leftovers() {
    local registries="" f pid
    for f in "$TEST_ENV_DIR"/registry-*/pid; do
        pid="$(cat "$f" 2>/dev/null || true)"
        if [ -n "$pid" ] && grep -qs docker-registry "/proc/$pid/cmdline"; then
            registries="${registries:+$registries }$pid"
        fi
    done
    echo
    echo "${B}Left behind${N} (scripts/test.sh reuses the first two):"
    echo "  - the test registries on 127.0.0.1:5000 and 127.0.0.1:5001 (scripts/test-env.sh; storage"
    echo "    under $TEST_ENV_DIR), pids: ${registries:-none found}"
    echo "  - the test images in the Docker engine: 127.0.0.1:5000/demo:{v1,v2,v3,crash,noport,sick,flaky}"
    if [ "$KEEP" = 1 ]; then
        echo "  - (KEEP=1) the agent: proxy and daemon (pids ${PIDS[*]:0:2}), state in $DEPLOY_AGENT_STATE_DIR,"
        echo "    and its containers and network (label io.deploy-agent.instance=$INSTANCE); to use it:"
        echo "      export DEPLOY_AGENT_STATE_DIR=$DEPLOY_AGENT_STATE_DIR DEPLOY_AGENT_CONFIG=$DEPLOY_AGENT_CONFIG"
        echo "      $AGENT status"
    fi
    echo "To remove it all:"
    if [ "$KEEP" = 1 ]; then
        echo "  kill ${PIDS[*]:0:2}"
        echo "  docker rm -f \$(docker ps -aq --filter label=io.deploy-agent.instance=$INSTANCE)"
        echo "  docker network rm \$(docker network ls -q --filter label=io.deploy-agent.instance=$INSTANCE)"
        echo "  rm -rf $DEMO_DIR"
    fi
    [ -z "$registries" ] || echo "  kill $registries"
    echo "  docker image rm \$(docker image ls --format '{{.Repository}}:{{.Tag}}' 127.0.0.1:5000/demo)"
    echo "  rm -rf $TEST_ENV_DIR"
}
PIDS=()
cleanup() {
    if [ "$KEEP" = 1 ]; then
        leftovers
        return
    fi
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    remove_containers
    rm -rf "$DEMO_DIR"
    leftovers
}
trap cleanup EXIT
remove_containers # leftovers of an earlier KEEP=1 run

wait_socket() {
    local sock="$1" pid="$2" log="$3"
    for _ in $(seq 1 100); do
        [ -S "$sock" ] && return 0
        kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; die "the process for $sock exited"; }
        sleep 0.1
    done
    cat "$log" >&2
    die "$sock did not appear"
}

step "Start the agent: deploy-agent proxy (data path) and deploy-agent run (control daemon)"
"$AGENT" proxy >"$DEMO_DIR/proxy.log" 2>&1 &
PIDS+=($!)
wait_socket "$DEPLOY_AGENT_STATE_DIR/proxy.sock" "$!" "$DEMO_DIR/proxy.log"
"$AGENT" run >"$DEMO_DIR/daemon.log" 2>&1 &
PIDS+=($!)
wait_socket "$DEPLOY_AGENT_STATE_DIR/agent.sock" "$!" "$DEMO_DIR/daemon.log"
echo "proxy pid ${PIDS[0]}, daemon pid ${PIDS[1]}, state $DEPLOY_AGENT_STATE_DIR"

COMPOSE="$DEMO_DIR/compose.yml"
cat >"$COMPOSE" <<EOF
services:
  web:
    image: "127.0.0.1:5000/demo:\${RELEASE}"
    ports:
      - "127.0.0.1:$PORT:80"
    x-deploy:
      health:
        http: /health
        port: 80
        interval: 500ms
        healthy_after: 2
        deadline: 8s
      drain_timeout: 10s
EOF
echo "compose file ($COMPOSE):"
sed 's/^/    /' "$COMPOSE"

deploy() {
    local release="$1" rc=0
    "$AGENT" deploy --project "$PROJECT" --file "$COMPOSE" --release "$release" --reason "demo" || rc=$?
    return "$rc"
}

step "Deploy v1"
deploy v1
echo "GET http://127.0.0.1:$PORT/ -> $(curl -s "http://127.0.0.1:$PORT/")"

step "Start a load loop: 300 requests/s on 127.0.0.1:$PORT (keep-alive and new connections)"
"$LOADGEN" --port "$PORT" --max-seconds 300 --expect v1,v2,v1 >"$DEMO_DIR/load.out" 2>&1 &
LOAD_PID=$!
PIDS+=("$LOAD_PID")
sleep 2

step "Deploy v2 under load"
deploy v2
sleep 1

step "Deploy v3 (broken: its /health answers 500)"
rc=0
deploy v3 || rc=$?
echo "exit code $rc (1 = the health gate refused v3 and the previous release serves)"
[ "$rc" = 1 ] || die "expected exit code 1 from the deploy of v3, got $rc"
echo "GET http://127.0.0.1:$PORT/ -> $(curl -s "http://127.0.0.1:$PORT/")"
sleep 1

step "deploy-agent rollback (to the previous good release)"
"$AGENT" rollback --project "$PROJECT"
sleep 2

step "Stop the load loop"
kill -TERM "$LOAD_PID"
load_rc=0
wait "$LOAD_PID" || load_rc=$?
cat "$DEMO_DIR/load.out"

step "deploy-agent status"
"$AGENT" status --project "$PROJECT"

step "deploy-agent history"
"$AGENT" history --project "$PROJECT"

step "deploy-agent audit verify"
"$AGENT" audit verify

failed="$(sed -n 's/.*"failed":\([0-9]*\).*/\1/p' "$DEMO_DIR/load.out" | tail -1)"
served="$(sed -n 's/.*"served":\[\([^]]*\)\].*/\1/p' "$DEMO_DIR/load.out" | tail -1 | tr -d '"' | sed 's/,/ -> /g')"
step "Summary"
echo "served release under load: $served"
echo "failed requests: ${failed:-?}"
echo "now serving: $(curl -s "http://127.0.0.1:$PORT/")"
[ "$load_rc" = 0 ] || die "the load loop saw failed requests or an unexpected sequence (see above)"
