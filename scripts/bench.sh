#!/usr/bin/env bash
# scripts/bench.sh: deploy-agent measured side by side with its peers that
# run on this machine, in one run, under the same load:
#   - deploy-agent (start-first, health-gated, proxy switch)
#   - docker-compose up -d (the script teams run today)
#   - Docker Swarm rolling update (--update-order start-first)
# and the agent's own costs: deploy overhead, rollback times, idle memory/CPU.
#
# Writes the table to docs/BENCHMARKS.md (between the BENCH markers) and
# prints it. Needs what scripts/test.sh needs; builds a release binary.
# Load goes to 127.0.0.1 only, bounded in time.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

RATE=${BENCH_RATE:-300}
bash scripts/test-env.sh >/dev/null
echo "==> building (release)"
cargo build --release -p deploy-agent -q
cargo build -p deploy-testkit --bin deploy-load -q
AGENT=$ROOT/target/release/deploy-agent
LOAD=$ROOT/target/debug/deploy-load
REG=127.0.0.1:5000

WORK=$(mktemp -d /tmp/deploy-bench.XXXXXX)
cleanup() {
    set +e
    [ -n "${PROXY_PID:-}" ] && kill "$PROXY_PID" 2>/dev/null
    [ -n "${RUN_PID:-}" ] && kill "$RUN_PID" 2>/dev/null
    docker ps -aq --filter label=io.deploy-agent.instance=bench | xargs -r docker rm -f >/dev/null
    docker network ls -q --filter label=io.deploy-agent.instance=bench | xargs -r docker network rm >/dev/null
    (cd "$WORK/compose" 2>/dev/null && docker-compose -p benchcompose down -t 1 >/dev/null 2>&1)
    docker service rm benchswarm >/dev/null 2>&1
    [ "${SWARM_STARTED:-0}" = 1 ] && docker swarm leave --force >/dev/null 2>&1
    rm -rf "$WORK"
}
trap cleanup EXIT

# load PORT SECONDS_MAX -> starts the loop in the background; stop_load writes
# "requests failed requests/s" (the rate reached: the tests do not ask for one)
start_load() {
    "$LOAD" --port "$1" --rate "$RATE" --max-seconds 300 >"$WORK/load.out" 2>&1 &
    LOAD_PID=$!
    sleep 2
}
stop_load() {
    kill -TERM "$LOAD_PID" 2>/dev/null || true
    wait "$LOAD_PID" 2>/dev/null || true
    python3 - "$WORK/load.out" >"$WORK/load.res" <<'EOF'
import json, sys
line = [l for l in open(sys.argv[1]) if l.startswith("{")][-1]
j = json.loads(line)
print(j["requests"], j["failed"], round(j["rate"]))
EOF
}
ms_since() { echo $((($(date +%s%N) - $1) / 1000000)); }

# ---------------------------------------------------------------- deploy-agent
echo "==> deploy-agent"
export DEPLOY_AGENT_STATE_DIR=$WORK/state DEPLOY_AGENT_CONFIG=$WORK/agent.toml
mkdir -p "$WORK/state"
printf 'instance = "bench"\nobserve_window = "0s"\n' >"$WORK/agent.toml"
cat >"$WORK/compose.yml" <<EOF
services:
  web:
    image: $REG/demo:\${RELEASE}
    ports: ["127.0.0.1:18180:80"]
    x-deploy:
      health: {http: /health, interval: 200ms, deadline: 20s}
      drain_timeout: 5s
EOF
"$AGENT" proxy >"$WORK/proxy.log" 2>&1 &
PROXY_PID=$!
"$AGENT" run >"$WORK/run.log" 2>&1 &
RUN_PID=$!
for _ in $(seq 50); do [ -S "$WORK/state/agent.sock" ] && break; sleep 0.1; done
"$AGENT" deploy --project bench --file "$WORK/compose.yml" --release v1 >/dev/null
start_load 18180
t=$(date +%s%N)
"$AGENT" deploy --project bench --file "$WORK/compose.yml" --release v2 >/dev/null
ours_deploy_ms=$(ms_since "$t")
t=$(date +%s%N)
"$AGENT" rollback --project bench >/dev/null
ours_rollback_ms=$(ms_since "$t")
stop_load
    read -r ours_req ours_failed ours_rate <"$WORK/load.res"
# App start-up on its own: create + start + first healthy probe of the same image.
t=$(date +%s%N)
cid=$(docker run -d --rm $REG/demo:v2)
ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$cid")
until curl -fsS -o /dev/null "http://$ip/health" 2>/dev/null; do sleep 0.05; done
app_start_ms=$(ms_since "$t")
docker rm -f "$cid" >/dev/null
# Warm rollback: the observation window keeps v1 running; a crash in the window rolls back.
cat >"$WORK/compose-warm.yml" <<EOF
x-deploy:
  observe: {window: 20s}
services:
  web:
    image: $REG/demo:\${TAG}
    ports: ["127.0.0.1:18180:80"]
    x-deploy:
      health: {http: /health, interval: 200ms, deadline: 20s}
      drain_timeout: 5s
EOF
# (exit 1 is the expected outcome: the release is rolled back)
warm_ms=$({ "$AGENT" deploy --project bench --file "$WORK/compose-warm.yml" --release crash1 --var TAG=crash --json 2>/dev/null || true; } |
    python3 -c 'import json,sys
for l in sys.stdin:
    j=json.loads(l)
    if j.get("type")=="result": print(j.get("switch_back_ms"))')
sleep 5
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
c0=$(cpu_ticks "$RUN_PID"); p0=$(cpu_ticks "$PROXY_PID")
sleep 30
c1=$(cpu_ticks "$RUN_PID"); p1=$(cpu_ticks "$PROXY_PID")
tck=$(getconf CLK_TCK)
run_rss=$(rss_kb "$RUN_PID"); proxy_rss=$(rss_kb "$PROXY_PID")
run_cpu=$(python3 -c "print(round(100*($c1-$c0)/$tck/30, 2))")
proxy_cpu=$(python3 -c "print(round(100*($p1-$p0)/$tck/30, 2))")
kill "$RUN_PID" "$PROXY_PID"; wait "$RUN_PID" "$PROXY_PID" 2>/dev/null || true
RUN_PID=; PROXY_PID=

# ---------------------------------------------------------------- docker-compose
echo "==> docker-compose up -d"
mkdir -p "$WORK/compose"
cat >"$WORK/compose/docker-compose.yml" <<EOF
version: "3"
services:
  web:
    image: $REG/demo:\${TAG}
    ports: ["127.0.0.1:18181:80"]
EOF
(cd "$WORK/compose" && TAG=v1 docker-compose -p benchcompose up -d >/dev/null 2>&1)
until curl -fsS -o /dev/null http://127.0.0.1:18181/health 2>/dev/null; do sleep 0.1; done
start_load 18181
t=$(date +%s%N)
(cd "$WORK/compose" && TAG=v2 docker-compose -p benchcompose up -d >/dev/null 2>&1)
until curl -fsS -o /dev/null http://127.0.0.1:18181/health 2>/dev/null; do sleep 0.05; done
compose_ms=$(ms_since "$t")
sleep 2
stop_load
    read -r compose_req compose_failed _ <"$WORK/load.res"
(cd "$WORK/compose" && docker-compose -p benchcompose down -t 1 >/dev/null 2>&1)

# ---------------------------------------------------------------- swarm
echo "==> docker swarm (update-order start-first)"
swarm_row="| Docker Swarm rolling update (start-first) | not measured: \`docker swarm init\` failed here | | |"
if docker info --format '{{.Swarm.LocalNodeState}}' | grep -q inactive &&
    docker swarm init --advertise-addr 127.0.0.1 >/dev/null 2>&1; then
    SWARM_STARTED=1
    docker service create -q --name benchswarm --publish 18182:80 --update-order start-first \
        --update-delay 0s --health-cmd 'wget -qO- http://127.0.0.1/health || exit 1' --health-interval 1s \
        $REG/demo:v1 >/dev/null
    for _ in $(seq 60); do curl -fsS -m 1 -o /dev/null http://127.0.0.1:18182/health 2>/dev/null && break; sleep 0.5; done
    if ! curl -fsS -m 1 -o /dev/null http://127.0.0.1:18182/health 2>/dev/null; then
        swarm_row="| Docker Swarm rolling update (start-first) | not measured: the task runs but the routing mesh (ingress) never answers on this machine | | |"
    else
    start_load 18182
    t=$(date +%s%N)
    docker service update -q --image $REG/demo:v2 benchswarm >/dev/null
    swarm_ms=$(ms_since "$t")
    sleep 2
    stop_load
    read -r swarm_req swarm_failed _ <"$WORK/load.res"
    swarm_row="| Docker Swarm rolling update (start-first) | $swarm_failed of $swarm_req | $swarm_ms ms | none (manual \`docker service rollback\`) |"
    fi
fi

table=$(cat <<EOF
Measured $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores, Docker $(docker version -f '{{.Server.Version}}'), load ${RATE} req/s offered (keep-alive and new connections; ${ours_rate} req/s reached through deploy-agent's proxy) on 127.0.0.1, image: static busybox httpd behind tcpserve.

| peer | failed requests during v1→v2 | time of the update | rollback |
|---|---|---|---|
| deploy-agent | $ours_failed of $ours_req (deploy, then rollback) | $ours_deploy_ms ms (app alone starts in $app_start_ms ms) | $ours_rollback_ms ms to a stopped previous release; ${warm_ms} ms from decision to traffic on a warm one |
| docker-compose up -d | $compose_failed of $compose_req | $compose_ms ms | none (redeploy the old tag by hand) |
$swarm_row

| deploy-agent at rest (30 s idle, release build) | control daemon | proxy |
|---|---|---|
| resident memory | $((run_rss / 1024)) MiB | $((proxy_rss / 1024)) MiB |
| CPU | ${run_cpu}% | ${proxy_cpu}% |
EOF
)
echo "$table"
python3 - "$ROOT/docs/BENCHMARKS.md" "$table" <<'EOF'
import sys, re
path, table = sys.argv[1], sys.argv[2]
text = open(path).read()
new = re.sub(r"<!-- BENCH -->.*<!-- /BENCH -->", "<!-- BENCH -->\n" + table + "\n<!-- /BENCH -->", text, flags=re.S)
open(path, "w").write(new)
EOF
