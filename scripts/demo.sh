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
# Needs Docker, docker-registry and busybox-static (see scripts/test.sh).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PORT="${DEMO_PORT:-8080}"
KEEP="${KEEP:-0}"
PROJECT=demo
INSTANCE=demo

if [ -t 1 ]; then B=$'\033[1m'; N=$'\033[0m'; else B=""; N=""; fi
step() { printf '\n%s==> %s%s\n' "$B" "$*" "$N"; }
die() { echo "scripts/demo.sh: $*" >&2; exit 1; }

command -v docker >/dev/null || die "docker not found (apt-get install docker.io)"
docker info >/dev/null 2>&1 || die "the Docker daemon does not answer: start it (dockerd &)"
if curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$PORT/"; then
    die "something already answers on 127.0.0.1:$PORT: set DEMO_PORT to a free port"
fi

step "Build (cargo build)"
cargo build -p deploy-agent -p deploy-testkit --bins
AGENT="$ROOT/target/debug/deploy-agent"
LOADGEN="$ROOT/target/debug/deploy-load"

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
PIDS=()
cleanup() {
    if [ "$KEEP" = 1 ]; then
        echo
        echo "Left running (KEEP=1): proxy and daemon (pids ${PIDS[*]}), state in $DEPLOY_AGENT_STATE_DIR."
        echo "  export DEPLOY_AGENT_STATE_DIR=$DEPLOY_AGENT_STATE_DIR DEPLOY_AGENT_CONFIG=$DEPLOY_AGENT_CONFIG"
        echo "  $AGENT status"
        return
    fi
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    remove_containers
    rm -rf "$DEMO_DIR"
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
