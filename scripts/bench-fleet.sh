#!/usr/bin/env bash
# scripts/bench-fleet.sh: how deploy-controller's cost grows with the size
# of an environment. Starts FLEET_HOSTS (12) agents on 127.0.0.1, each a
# "host" of its own (deploy-agent proxy + run, own state dir, instance
# label, HTTPS API port and published port, mutual TLS from a private CA
# made here), then for environments of 1, 3, 6 and 12 of them (canary 1,
# then one batch of all the rest) and of 12 in batches of 3 (canary + 4
# batches): deploys v1, then times `deploy-controller deploy` of v2 (wall
# clock, the controller's CPU time and peak RSS), FLEET_REPS (3) times.
#
# Prints a Markdown table and writes it to docs/BENCHMARKS.md between the
# FLEET markers. Needs what scripts/test.sh needs (Docker, docker-registry,
# busybox-static) and python3; builds release binaries. Everything it
# starts is removed on exit: its agents, and the containers and networks
# labelled with its own instance labels (fb<pid>-hNN), nothing else.
#
# Every "host" here shares one machine and one Docker Engine: see
# docs/BENCHMARKS.md for what that means for the numbers.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

N=${FLEET_HOSTS:-12}
REPS=${FLEET_REPS:-3}
MAX_SECONDS=${FLEET_MAX_SECONDS:-540}   # the measuring part gives up past this
DEPLOY_TIMEOUT=120                      # one controller run
ENVNAME=fleetbench                      # the agents' `environment`
CLIENT=ci-fleetbench                    # the controller's certificate CN

die() { echo "scripts/bench-fleet.sh: $*" >&2; exit 1; }

for c in docker curl python3 cargo timeout; do
    command -v "$c" >/dev/null || die "$c not found (see README: scripts/test.sh needs the same tools)"
done
[[ "$N" =~ ^[0-9]+$ ]] && [ "$N" -ge 6 ] && [ "$N" -le 40 ] || die "FLEET_HOSTS must be 6-40 (got $N)"
[[ "$REPS" =~ ^[0-9]+$ ]] && [ "$REPS" -ge 1 ] || die "FLEET_REPS must be at least 1 (got $REPS)"
grep -q '<!-- FLEET -->' docs/BENCHMARKS.md && grep -q '<!-- /FLEET -->' docs/BENCHMARKS.md ||
    die "docs/BENCHMARKS.md has no <!-- FLEET --> ... <!-- /FLEET --> markers to write the table between"
if [ -x /usr/bin/time ] && /usr/bin/time -f '%e' true 2>/dev/null; then
    GNU_TIME=/usr/bin/time
else
    GNU_TIME= # measured through wait4(2) by python3 instead (see measure below)
fi

echo "==> test environment (registry on 127.0.0.1:5000, test images)"
bash scripts/test-env.sh >/dev/null || die "scripts/test-env.sh failed (run it alone to see why)"
echo "==> building (release)"
cargo build --release -q -p deploy-agent -p deploy-controller
AGENT=$ROOT/target/release/deploy-agent
CTL=$ROOT/target/release/deploy-controller
[ -x "$AGENT" ] && [ -x "$CTL" ] || die "release binaries missing after the build"

WORK=$(mktemp -d /tmp/deploy-bench-fleet.XXXXXX)
PREFIX="fb$$"
PIDS=()       # the daemons
PROXY_PIDS=() # the proxies
instance() { printf '%s-h%02d' "$PREFIX" "$1"; }
cleanup() {
    set +e
    local pid i inst ids
    # The daemons first (so that none restarts a container), then the proxies.
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    for pid in "${PROXY_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${PROXY_PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    for i in $(seq 1 "$N"); do
        inst=$(instance "$i")
        ids=$(docker ps -aq --filter "label=io.deploy-agent.instance=$inst")
        [ -z "$ids" ] || docker rm -f $ids >/dev/null
        ids=$(docker network ls -q --filter "label=io.deploy-agent.instance=$inst")
        [ -z "$ids" ] || docker network rm $ids >/dev/null
        ids=$(docker volume ls -q --filter "label=io.deploy-agent.instance=$inst")
        [ -z "$ids" ] || docker volume rm -f $ids >/dev/null
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- ports
# 2N consecutive ports in 19000-19999 that nothing listens on: N API ports,
# then N published ports.
BASE=$(python3 - "$N" <<'EOF'
import random, socket, sys
n = 2 * int(sys.argv[1])
bases = list(range(19000, 20000 - n, n))
random.shuffle(bases)
for b in bases:
    ok = True
    for p in range(b, b + n):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            ok = False
        finally:
            s.close()
        if not ok:
            break
    if ok:
        print(b)
        sys.exit(0)
sys.exit(1)
EOF
) || die "no $((2 * N)) free consecutive ports in 19000-19999"
api_port() { echo $((BASE + $1 - 1)); }
app_port() { echo $((BASE + N + $1 - 1)); }

# ---------------------------------------------------------------- PKI, agents
echo "==> PKI and $N agents (API ports $(api_port 1)-$(api_port "$N"), published ports $(app_port 1)-$(app_port "$N"))"
PKI=$WORK/pki
"$CTL" pki init --dir "$PKI" --days 2 >/dev/null
"$CTL" pki issue --dir "$PKI" --name "$CLIENT" --kind client --days 2 >/dev/null
for i in $(seq 1 "$N"); do
    inst=$(instance "$i")
    d=$WORK/agents/$i
    mkdir -p "$d/state"
    "$CTL" pki issue --dir "$PKI" --name "agent-$inst" --kind agent --san 127.0.0.1 --san localhost --days 2 >/dev/null
    # retain = 2 (the minimum: the serving and the previous release) keeps
    # each host at two containers whatever the number of runs, so that later
    # scenarios do not run on a Docker Engine with more containers in it.
    cat >"$d/agent.toml" <<EOF
instance = "$inst"
observe_window = "0s"
retain = 2
api_listen = "127.0.0.1:$(api_port "$i")"
tls_cert = "$PKI/agent-$inst.pem"
tls_key = "$PKI/agent-$inst-key.pem"
tls_ca = "$PKI/ca.pem"
environment = "$ENVNAME"

[grants]
"$CLIENT" = "deployer"
EOF
    DEPLOY_AGENT_STATE_DIR=$d/state DEPLOY_AGENT_CONFIG=$d/agent.toml "$AGENT" check-config >/dev/null ||
        die "agent $i: check-config refused $d/agent.toml"
    DEPLOY_AGENT_STATE_DIR=$d/state DEPLOY_AGENT_CONFIG=$d/agent.toml "$AGENT" proxy >"$d/proxy.log" 2>&1 &
    PROXY_PIDS+=($!)
done
for i in $(seq 1 "$N"); do
    d=$WORK/agents/$i
    for _ in $(seq 100); do [ -S "$d/state/proxy.sock" ] && break; sleep 0.05; done
    [ -S "$d/state/proxy.sock" ] || { cat "$d/proxy.log" >&2; die "agent $i: the proxy did not start"; }
    DEPLOY_AGENT_STATE_DIR=$d/state DEPLOY_AGENT_CONFIG=$d/agent.toml "$AGENT" run >"$d/run.log" 2>&1 &
    PIDS+=($!)
done
for i in $(seq 1 "$N"); do
    d=$WORK/agents/$i
    up=0
    for _ in $(seq 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$(api_port "$i")") 2>/dev/null; then up=1; break; fi
        sleep 0.05
    done
    [ "$up" = 1 ] || { tail -20 "$d/run.log" >&2; die "agent $i: the HTTPS API on 127.0.0.1:$(api_port "$i") did not come up"; }
done

# ---------------------------------------------------------------- inventory
cat >"$WORK/compose.yml" <<'EOF'
services:
  web:
    image: "127.0.0.1:5000/demo:${TAG}"
    ports:
      - "127.0.0.1:${PORT}:80"
    x-deploy:
      health:
        http: /health
        port: 80
        interval: 200ms
        timeout: 1s
        healthy_after: 1
        unhealthy_after: 2
        start_period: 0s
        deadline: 20s
      drain_timeout: 5s
      proxy: http
EOF
# SCENARIOS: "name hosts batch"
SCENARIOS=("hosts1 1 100%" "hosts3 3 100%" "hosts6 6 100%" "hosts$N $N 100%" "hosts${N}b3 $N 3")
{
    printf '[tls]\nca = "%s"\ncert = "%s"\nkey = "%s"\n' "$PKI/ca.pem" "$PKI/$CLIENT.pem" "$PKI/$CLIENT-key.pem"
    for s in "${SCENARIOS[@]}"; do
        read -r name hosts batch <<<"$s"
        if [[ "$batch" == *% ]]; then b="\"$batch\""; else b=$batch; fi
        printf '\n[environments.%s]\nproject = "web"\ncompose = "compose.yml"\nlock_ttl = "30s"\nstrategy = { canary = 1, batch = %s }\n' "$name" "$b"
        for i in $(seq 1 "$hosts"); do
            printf '\n[[environments.%s.hosts]]\nname = "h%02d"\nagent = "127.0.0.1:%s"\nvars = { PORT = "%s" }\n' \
                "$name" "$i" "$(api_port "$i")" "$(app_port "$i")"
        done
    done
} >"$WORK/deploy.toml"

# ---------------------------------------------------------------- measuring
# Stamps each line of the controller's --json output with its arrival time
# (ms since the epoch): the controller's own `ts` has whole seconds only.
cat >"$WORK/stamp.py" <<'EOF'
import sys, time
out = sys.stdout
for line in sys.stdin:
    out.write("%d\t%s" % (time.time_ns() // 1_000_000, line))
    out.flush()
EOF
# wait4(2) gives what /usr/bin/time gives: used when it is not installed.
cat >"$WORK/rusage.py" <<'EOF'
import os, sys, time
out, argv = sys.argv[1], sys.argv[2:]
t = time.monotonic()
pid = os.fork()
if pid == 0:
    os.execvp(argv[0], argv)
_, status, ru = os.wait4(pid, 0)
with open(out, "w") as f:
    f.write("%.2f %d %.2f %.2f\n" % (time.monotonic() - t, ru.ru_maxrss, ru.ru_utime, ru.ru_stime))
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
EOF

ctl() { "$CTL" --inventory "$WORK/deploy.toml" --transport agent "$@"; }

# deploy ENV RELEASE TAG OUT [measure]: runs the controller; OUT gets the
# stamped JSON lines, OUT.time "wall_s maxrss_kib user_s sys_s", OUT.ms the
# wall clock in ms. Dies with the output on failure.
deploy() {
    local env=$1 rel=$2 tag=$3 out=$4 rc=0 t0
    [ "$SECONDS" -lt "$MAX_SECONDS" ] || die "over FLEET_MAX_SECONDS=$MAX_SECONDS s; stopping"
    local cmd=("$CTL" --inventory "$WORK/deploy.toml" --transport agent deploy --env "$env" --release "$rel" --var "TAG=$tag" --json)
    t0=$(date +%s%N)
    if [ -n "$GNU_TIME" ]; then
        timeout "$DEPLOY_TIMEOUT" "$GNU_TIME" -f '%e %M %U %S' -o "$out.time" "${cmd[@]}" 2>"$out.err" |
            python3 -u "$WORK/stamp.py" >"$out" || rc=$?
    else
        timeout "$DEPLOY_TIMEOUT" python3 "$WORK/rusage.py" "$out.time" "${cmd[@]}" 2>"$out.err" |
            python3 -u "$WORK/stamp.py" >"$out" || rc=$?
    fi
    echo $((($(date +%s%N) - t0) / 1000000)) >"$out.ms"
    echo "$t0" >"$out.t0"
    if [ "$rc" != 0 ]; then
        cut -f2- "$out" | tail -30 >&2
        cat "$out.err" >&2
        die "deploy of $rel to $env failed (exit $rc)"
    fi
}

# check ENV HOSTS BODY: every host of the scenario answers BODY on its published port.
check() {
    local i body
    for i in $(seq 1 "$2"); do
        body=$(curl -fsS -m 3 "http://127.0.0.1:$(app_port "$i")/" 2>&1) || true
        [ "$body" = "$3" ] || die "$1: host h$(printf %02d "$i") answers ${body:-nothing}, expected $3"
    done
}

mkdir -p "$WORK/runs"
for s in "${SCENARIOS[@]}"; do
    read -r name hosts batch <<<"$s"
    echo "==> $name: $hosts host(s), canary 1 then batch $batch; $REPS x (v1, then v2 timed)"
    for r in $(seq 1 "$REPS"); do
        deploy "$name" "$name-r$r-v1" v1 "$WORK/runs/$name-$r-v1.jsonl"
        check "$name" "$hosts" v1
        deploy "$name" "$name-r$r-v2" v2 "$WORK/runs/$name-$r-v2.jsonl"
        check "$name" "$hosts" v2
        printf '    run %d: v2 in %s ms\n' "$r" "$(cat "$WORK/runs/$name-$r-v2.jsonl.ms")"
    done
done

# ---------------------------------------------------------------- report
SPEC=$(printf '%s\n' "${SCENARIOS[@]}")
table=$(python3 - "$WORK/runs" "$REPS" "$SPEC" "$(nproc)" "$(docker version -f '{{.Server.Version}}')" \
    "$(date -u +%Y-%m-%dT%H:%MZ)" "${GNU_TIME:-wait4}" <<'EOF'
import json, statistics, sys
from datetime import datetime

runs, reps, spec, cores, docker, when, meter = sys.argv[1:8]
reps = int(reps)

def ts_ms(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() * 1000

def parse(path):
    t0 = int(open(path + ".t0").read()) / 1e6
    wall = int(open(path + ".ms").read())
    tw, rss_kib, user, sys_ = open(path + ".time").read().split()
    lines = []
    for l in open(path):
        t, _, j = l.partition("\t")
        if j.strip().startswith("{"):
            lines.append((int(t) - t0, json.loads(j)))
    # Phases as the controller printed them, with arrival times.
    waves, marks = [], {}
    for t, j in lines:
        if j.get("type") != "phase":
            continue
        m = j["message"]
        if m.startswith("pre-pull"):
            marks["prepull"] = t
        elif m.startswith("environment lock"):
            marks["locked"] = t
        elif m.startswith("canary:") or m.startswith("batch "):
            waves.append({"start": t, "name": m.split(":")[0], "hosts": []})
    summary = next(j for _, j in reversed(lines) if j.get("type") == "summary")
    t_summary = next(t for t, j in reversed(lines) if j.get("type") == "summary")
    # Per host: the agent's events (its own timestamps) and its result.
    per_host = {}
    for t, j in lines:
        ev = j.get("event")
        if j.get("type") != "host" or not isinstance(ev, dict):
            continue
        h = per_host.setdefault(j["host"], {"steps": [], "first_arrival": t})
        if ev.get("type") == "progress":
            h["steps"].append((ts_ms(ev["ts"]) - t0, ev["step"]))
        elif ev.get("type") == "result":
            h["result_arrival"] = t
            h["agent_ms"] = ev["duration_ms"]
    # A host belongs to the wave during which its first event arrived.
    for w_i, w in enumerate(waves):
        w["end"] = waves[w_i + 1]["start"] if w_i + 1 < len(waves) else t_summary
        w["hosts"] = [n for n, h in per_host.items() if w["start"] <= h["first_arrival"] < w["end"]]
    return {
        "wall": wall, "rss_mib": int(rss_kib) / 1024, "cpu_ms": (float(user) + float(sys_)) * 1000,
        "prepull_lock": marks.get("locked", 0) - marks.get("prepull", 0),
        "startup": marks.get("prepull", 0),
        "waves": waves, "per_host": per_host, "t_summary": t_summary,
        "summary": summary,
    }

rows, details = [], []
for line in spec.strip().splitlines():
    name, hosts, batch = line.split()
    rs = [parse(f"{runs}/{name}-{r}-v2.jsonl") for r in range(1, reps + 1)]
    med = lambda xs: statistics.median(xs)
    walls = [r["wall"] for r in rs]
    nwaves = len(rs[0]["waves"])
    batches = nwaves - 1
    strat = "canary 1" + (f" + {batches} batch{'es' if batches > 1 else ''} of ≤{batch if not batch.endswith('%') else int(hosts) - 1}" if batches else "")
    # The slowest host of each wave, by the agent's own duration.
    slowest = [max(r["per_host"][h]["agent_ms"] for h in w["hosts"]) if w["hosts"] else 0
               for r in rs for w in r["waves"]]
    agent_path = [sum(max(r["per_host"][h]["agent_ms"] for h in w["hosts"]) for w in r["waves"] if w["hosts"]) for r in rs]
    wave_ms = [sum(w["end"] - w["start"] for w in r["waves"]) for r in rs]
    rows.append(
        f"| {hosts} | {strat} | {nwaves} | **{med(walls):.0f} ms** ({min(walls)}–{max(walls)}) "
        f"| {med([r['prepull_lock'] for r in rs]):.0f} ms "
        f"| {med(wave_ms):.0f} ms | {med(agent_path):.0f} ms "
        f"| {med([r['cpu_ms'] for r in rs]):.0f} ms | {max(r['rss_mib'] for r in rs):.1f} MiB |"
    )
    # Where a wave's time goes, for the detail lines: per wave, the agents'
    # durations (min / max) next to the wave's time seen by the controller.
    r = sorted(rs, key=lambda r: r["wall"])[len(rs) // 2]
    parts = []
    for w in r["waves"]:
        d = [r["per_host"][h]["agent_ms"] for h in w["hosts"]]
        parts.append(f"{w['name']} ({len(d)} host{'s' if len(d) > 1 else ''}): {w['end'] - w['start']:.0f} ms, agents {min(d)}–{max(d)} ms")
    details.append(f"- {hosts} hosts, {strat}: " + "; ".join(parts))

print(f"Measured {when} on {cores} cores, Docker {docker}: every \"host\" is a deploy-agent (proxy + daemon) on this one machine, sharing its cores and its Docker Engine. "
      f"Median of {reps} runs (range in brackets); `deploy-controller deploy` of v2 over v1, busybox httpd app with a 200 ms HTTP health probe, observation window 0 s; "
      f"controller CPU and peak RSS from {'/usr/bin/time' if meter != 'wait4' else 'wait4(2)'}.")
print()
print("| hosts | strategy | waves | wall clock of the deploy | pre-pull + lock | waves (sum) | slowest agent per wave (sum) | controller CPU (user+sys) | controller peak RSS |")
print("|---|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
print()
print("Per wave (the median run): the wave's time as the controller saw it, and the agents' own deploy durations (`duration_ms` of their results):")
print()
print("\n".join(details))
EOF
)
echo
echo "$table"
python3 - "$ROOT/docs/BENCHMARKS.md" "$table" <<'EOF'
import sys, re
path, table = sys.argv[1], sys.argv[2]
text = open(path).read()
new = re.sub(r"<!-- FLEET -->.*<!-- /FLEET -->", lambda _: "<!-- FLEET -->\n" + table + "\n<!-- /FLEET -->", text, flags=re.S)
open(path, "w").write(new)
EOF
echo
echo "written to docs/BENCHMARKS.md (between the FLEET markers); total ${SECONDS}s"
