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
# docs/BENCHMARKS.md for what that means for the numbers. As a reference,
# it also times the Docker Engine alone starting 1..N-1 containers at once.
#
# Environment: FLEET_HOSTS (12), FLEET_REPS (3 rounds), FLEET_MAX_SECONDS
# (420: no new deploy after this many seconds past the build),
# FLEET_KEEP_RUNS=DIR (keep every run's stamped --json output there).
# About 100 s after the build on 2 cores.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

N=${FLEET_HOSTS:-12}
REPS=${FLEET_REPS:-3}
MAX_SECONDS=${FLEET_MAX_SECONDS:-420}   # after the build: no new deploy past this
DEPLOY_TIMEOUT=120                      # one controller run
ENVNAME=fleetbench                      # the agents' `environment`
CLIENT=ci-fleetbench                    # the controller's certificate CN

die() { echo "scripts/bench-fleet.sh: $*" >&2; exit 1; }

for c in docker curl python3 cargo; do
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
SECONDS=0 # the bound below is on the measuring part, not on a cold build

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
    for inst in $(for i in $(seq 1 "$N"); do instance "$i"; echo; done) "$PREFIX-ref"; do
        ids=$(docker ps -aq --filter "label=io.deploy-agent.instance=$inst")
        [ -z "$ids" ] || docker rm -f $ids >/dev/null
        ids=$(docker network ls -q --filter "label=io.deploy-agent.instance=$inst")
        [ -z "$ids" ] || docker network rm $ids >/dev/null
        ids=$(docker volume ls -q --filter "label=io.deploy-agent.instance=$inst")
        [ -z "$ids" ] || docker volume rm -f $ids >/dev/null
    done
    if [ -n "${FLEET_KEEP_RUNS:-}" ] && [ -d "$WORK/runs" ]; then
        mkdir -p "$FLEET_KEEP_RUNS" && cp -r "$WORK/runs/." "$FLEET_KEEP_RUNS/" &&
            echo "the controller's output of every run is in $FLEET_KEEP_RUNS"
    fi
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
# measure.py OUT TIMEOUT_S -- CMD...: runs CMD (the controller; killed
# after TIMEOUT_S) and writes
#   OUT         its --json lines, each stamped with its arrival time (ms
#               since the start; the controller's own `ts` has whole seconds),
#   OUT.err     its stderr,
#   OUT.ms      the wall clock (ms), OUT.epoch0 the start (ns since the epoch),
#   OUT.time    "wall_s maxrss_kib user_s sys_s" from wait4(2), unless
#               /usr/bin/time, then the head of CMD, wrote it.
# The clock starts just before the fork, after python's own start-up.
cat >"$WORK/measure.py" <<'EOF'
import os, signal, subprocess, sys, threading, time
out, timeout, argv = sys.argv[1], float(sys.argv[2]), sys.argv[4:]
def stop(*_):
    raise SystemExit(143)
signal.signal(signal.SIGTERM, stop)
epoch0 = time.time_ns()
t0 = time.monotonic_ns()
with open(out + ".err", "w") as err:
    # Its own process group, killed whole (with /usr/bin/time's child) on a
    # timeout or when this script is stopped.
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
def kill():
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
timer = threading.Timer(timeout, kill)
timer.start()
try:
    with open(out, "w") as f:
        for line in p.stdout:
            f.write("%.1f\t%s" % ((time.monotonic_ns() - t0) / 1e6, line.decode()))
    _, status, ru = os.wait4(p.pid, 0)
except BaseException:
    kill()
    raise
finally:
    timer.cancel()
wall = (time.monotonic_ns() - t0) / 1e6
code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
if wall >= timeout * 1000:
    print(f"killed after {timeout:.0f} s", file=sys.stderr)
with open(out + ".ms", "w") as f:
    f.write("%d\n" % wall)
with open(out + ".epoch0", "w") as f:
    f.write("%d\n" % epoch0)
if not os.path.exists(out + ".time"):
    with open(out + ".time", "w") as f:
        f.write("%.2f %d %.2f %.2f\n" % (wall / 1000, ru.ru_maxrss, ru.ru_utime, ru.ru_stime))
sys.exit(code)
EOF

# deploy ENV RELEASE TAG OUT: one `deploy-controller deploy`, measured
# (measure.py, and /usr/bin/time when installed); dies with its output on
# failure.
deploy() {
    local env=$1 rel=$2 tag=$3 out=$4 rc=0
    [ "$SECONDS" -lt "$MAX_SECONDS" ] || die "over FLEET_MAX_SECONDS=$MAX_SECONDS s; stopping"
    local cmd=("$CTL" --inventory "$WORK/deploy.toml" --transport agent
        deploy --env "$env" --release "$rel" --var "TAG=$tag" --json)
    [ -z "$GNU_TIME" ] || cmd=("$GNU_TIME" -f '%e %M %U %S' -o "$out.time" "${cmd[@]}")
    python3 "$WORK/measure.py" "$out" "$DEPLOY_TIMEOUT" -- "${cmd[@]}" || rc=$?
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

# Round r runs every scenario once (so that a drift of the machine over the
# run spreads over all of them): v1 (untimed), then v2 (measured).
mkdir -p "$WORK/runs"
for r in $(seq 1 "$REPS"); do
    echo "==> round $r of $REPS"
    for s in "${SCENARIOS[@]}"; do
        read -r name hosts batch <<<"$s"
        deploy "$name" "$name-r$r-v1" v1 "$WORK/runs/$name-$r-v1.jsonl"
        check "$name" "$hosts" v1
        deploy "$name" "$name-r$r-v2" v2 "$WORK/runs/$name-$r-v2.jsonl"
        check "$name" "$hosts" v2
        printf '    %-10s %2d host(s), canary 1 then batch %-4s  v2 in %5s ms\n' \
            "$name" "$hosts" "$batch" "$(cat "$WORK/runs/$name-$r-v2.jsonl.ms")"
    done
done

# ---------------------------------------------------------------- Docker alone
# The reference: what the one Docker Engine all these "hosts" share takes to
# create and start K containers at once, without any agent (ref.py).
echo "==> the Docker Engine alone: containers created and started at once"
cat >"$WORK/ref.py" <<'EOF'
# ref.py SOCKET IMAGE LABEL_VALUE PREFIX REPS SIZE...: for each SIZE, REPS
# times: SIZE containers of IMAGE, each on its own bridge network (as each
# agent's project has), created and started at once through the Engine's
# API (what an agent's start_new step does), timed until the last start
# returns; then removed (not timed). Prints "SIZE median_ms" per size.
import http.client, json, socket, statistics, sys, threading, time

sock_path, image, label, prefix, reps = sys.argv[1:6]
sizes = [int(s) for s in sys.argv[6:]]
LABEL = "io.deploy-agent.instance"

class Conn(http.client.HTTPConnection):
    def __init__(self):
        super().__init__("localhost", timeout=60)
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(sock_path)

def call(method, path, body=None):
    c = Conn()
    data = json.dumps(body).encode() if body is not None else None
    c.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
    r = c.getresponse()
    out = r.read()
    c.close()
    if r.status >= 300:
        raise RuntimeError(f"docker API {method} {path}: {r.status} {out[:300]!r}")
    return out

nets = [f"{prefix}-net{i}" for i in range(max(sizes))]
for n in nets:
    call("POST", "/networks/create", {"Name": n, "Driver": "bridge", "Labels": {LABEL: label}})

def one(name, net, errors):
    try:
        call("POST", f"/containers/create?name={name}", {
            "Image": image, "Labels": {LABEL: label}, "ExposedPorts": {"80/tcp": {}},
            "HostConfig": {"NetworkMode": net, "RestartPolicy": {"Name": "no"}},
            "NetworkingConfig": {"EndpointsConfig": {net: {"Aliases": ["web"]}}},
        })
        call("POST", f"/containers/{name}/start")
    except Exception as e:
        errors.append(str(e))

run = 0
for size in sizes:
    times = []
    for _ in range(int(reps)):
        run += 1
        names = [f"{prefix}-c{run}-{i}" for i in range(size)]
        errors = []
        threads = [threading.Thread(target=one, args=(n, nets[i], errors)) for i, n in enumerate(names)]
        t = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        times.append((time.monotonic() - t) * 1000)
        for n in names:
            try:
                call("DELETE", f"/containers/{n}?force=true")
            except RuntimeError:
                pass
        if errors:
            sys.exit("; ".join(errors))
    print(size, round(statistics.median(times)))
for n in nets:
    call("DELETE", f"/networks/{n}")
EOF
DOCKER_SOCK=/var/run/docker.sock
case "${DOCKER_HOST:-}" in unix://*) DOCKER_SOCK=${DOCKER_HOST#unix://} ;; esac
REF_SIZES=$(printf '%s\n' 1 2 3 5 $((N - 1)) | sort -nu | tr '\n' ' ')
# shellcheck disable=SC2086
python3 "$WORK/ref.py" "$DOCKER_SOCK" 127.0.0.1:5000/demo:v2 "$PREFIX-ref" "$PREFIX-ref" 3 $REF_SIZES >"$WORK/ref.txt" ||
    die "the Docker reference measurement failed"
sed 's/^/    /; s/ \([0-9]*\)$/ container(s): \1 ms/' "$WORK/ref.txt"

# ---------------------------------------------------------------- report
SPEC=$(printf '%s\n' "${SCENARIOS[@]}")
table=$(python3 - "$WORK/runs" "$REPS" "$SPEC" "$(nproc)" "$(docker version -f '{{.Server.Version}}')" \
    "$(date -u +%Y-%m-%dT%H:%MZ)" "${GNU_TIME:-wait4}" "$WORK/ref.txt" <<'EOF'
import json, statistics, sys
from datetime import datetime

runs, reps, spec, cores, docker, when, meter, ref = sys.argv[1:9]
reps = int(reps)
med = statistics.median

def ts_ms(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() * 1000

def parse(path):
    """One measured run: the arrival-stamped --json lines -> phases, waves, hosts.
    Times are ms since the controller was started; the agents' own event
    timestamps (same machine, same clock) are brought to the same origin."""
    epoch0 = int(open(path + ".epoch0").read()) / 1e6
    wall = int(open(path + ".ms").read())
    _, rss_kib, user, sys_ = open(path + ".time").read().split()
    lines = []
    for l in open(path):
        t, _, j = l.partition("\t")
        if j.strip().startswith("{"):
            lines.append((float(t), json.loads(j)))
    marks, waves = {}, []
    for t, j in lines:
        typ, m = j.get("type"), j.get("message", "")
        if typ == "phase" and m.startswith("pre-pull"):
            marks["prepull"] = t
        elif typ == "host" and "event" not in j and m.startswith("pulled"):
            marks.setdefault("pulled", t)
        elif typ == "phase" and m.startswith("environment lock"):
            marks["locked"] = t
        elif typ == "phase" and (m.startswith("canary:") or m.startswith("batch ")):
            waves.append({"start": t, "name": m.split(":")[0]})
    t_summary = next(t for t, j in reversed(lines) if j.get("type") == "summary")
    hosts = {}
    for t, j in lines:
        ev = j.get("event")
        if j.get("type") != "host" or not isinstance(ev, dict):
            continue
        h = hosts.setdefault(j["host"], {"first": t, "steps": {}})
        if ev.get("type") == "progress":
            h["steps"].setdefault(ev["step"], ts_ms(ev["ts"]) - epoch0)
        elif ev.get("type") == "result":
            h["agent_ms"] = ev["duration_ms"]
    for i, w in enumerate(waves):
        w["end"] = waves[i + 1]["start"] if i + 1 < len(waves) else t_summary
        # A host belongs to the wave during which its first event arrived.
        w["hosts"] = [hosts[n] for n in hosts if w["start"] <= hosts[n]["first"] < w["end"]]
        w["time"] = w["end"] - w["start"]
        w["slowest"] = max(h["agent_ms"] for h in w["hosts"])
        # The last host of the wave to begin, by its agent's first event.
        w["reached"] = max(min(h["steps"].values()) for h in w["hosts"]) - w["start"]
        # Starting the new container: from start_new to the health gate's first probe.
        w["start_new"] = max(h["steps"]["await_healthy"] - h["steps"]["start_new"] for h in w["hosts"])
    agents = sum(w["slowest"] for w in waves)
    return {
        "wall": wall, "rss_mib": int(rss_kib) / 1024, "cpu_ms": (float(user) + float(sys_)) * 1000,
        "prepull": marks["pulled"] - marks["prepull"], "lock": marks["locked"] - marks["pulled"],
        "waves": waves, "agents": agents, "rest": wall - agents,
    }

rows, wave_rows, res = [], [], []
for line in spec.strip().splitlines():
    name, hosts, batch = line.split()
    rs = [parse(f"{runs}/{name}-{r}-v2.jsonl") for r in range(1, reps + 1)]
    waves = rs[0]["waves"]
    sizes = [len(w["hosts"]) for w in waves]
    strat = "canary 1" + (f", then {len(sizes) - 1} batch{'es' if len(sizes) > 2 else ''} of " +
                          "/".join(str(s) for s in sizes[1:]) if len(sizes) > 1 else "")
    m = {k: med([r[k] for r in rs]) for k in ("wall", "agents", "rest", "prepull", "lock", "cpu_ms")}
    m.update(hosts=int(hosts), waves=len(waves), rss=max(r["rss_mib"] for r in rs),
             share=max(x["time"] - x["slowest"] for r in rs for x in r["waves"]),
             reached=max(x["reached"] for r in rs for x in r["waves"]),
             first_start=med([r["waves"][0]["start_new"] for r in rs]),
             last_slowest=med([r["waves"][-1]["slowest"] for r in rs]),
             last_start=med([r["waves"][-1]["start_new"] for r in rs]))
    res.append(m)
    walls = [r["wall"] for r in rs]
    rows.append(
        f"| {hosts} | {strat} | {len(waves)} | **{m['wall']:.0f} ms** ({min(walls)}–{max(walls)}) "
        f"| {m['agents']:.0f} ms | {m['rest']:.0f} ms (pre-pull {m['prepull']:.0f}, lock {m['lock']:.0f}) "
        f"| {m['cpu_ms']:.0f} ms | {m['rss']:.1f} MiB |"
    )
    for i, w in enumerate(waves):
        ws = [r["waves"][i] for r in rs]
        wave_rows.append(
            f"| {hosts}, {strat} | {w['name']} | {len(w['hosts'])} | {med([x['time'] for x in ws]):.0f} ms "
            f"| {max(0, med([x['reached'] for x in ws])):.0f} ms "
            f"| {med([x['slowest'] for x in ws]):.0f} ms "
            f"| {med([x['time'] - x['slowest'] for x in ws]):.0f} ms "
            f"| {med([x['start_new'] for x in ws]):.0f} ms |"
        )
refs = [tuple(int(x) for x in l.split()) for l in open(ref).read().split("\n") if l.strip()]

print(f"Measured {when} on {cores} cores, Docker {docker}. Every \"host\" is a deploy-agent (proxy + daemon) "
      f"on this one machine: they share its {cores} cores and its one Docker Engine. "
      f"`deploy-controller deploy` of v2 over v1 (busybox httpd, HTTP health probe every 200 ms, observation window 0 s); "
      f"median of {reps} runs, range in brackets; controller CPU and peak RSS from "
      f"{'/usr/bin/time' if meter != 'wait4' else 'wait4(2)'}.")
print()
print("| hosts | strategy | waves | wall clock of the deploy | the agents' part: slowest host of each wave, summed "
      "| the rest: controller start, pre-pull, lock, dispatch, release | controller CPU (user+sys) | controller peak RSS |")
print("|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
print()
print("Each wave (medians): its time as the controller saw it; when its last host began (its agent's first "
      "event, by the agent's clock); the slowest host's own deploy time (`duration_ms` of its agent's result); "
      "the controller's share (the wave minus that); and the slowest container start (`start_new` to the first "
      "health probe: Docker creating and starting the container).")
print()
print("| environment | wave | hosts | wave | last host began after | slowest host's deploy | controller's share | slowest container start |")
print("|---|---|---|---|---|---|---|---|")
print("\n".join(wave_rows))
print()
print("The Docker Engine alone, no agent: containers created and started at once through its API, "
      "each on its own bridge network (median of 3):")
print()
print("| containers at once | " + " | ".join(str(s) for s, _ in refs) + " |")
print("|---|" + "---|" * len(refs))
print("| time until the last one started | " + " | ".join(f"{ms} ms" for _, ms in refs) + " |")
print()
# What the figures say, computed from them.
one, big, batched = res[0], res[-2], res[-1]
two_wave = [r for r in res if r["waves"] == 2]
ref1 = dict(refs).get(1)
refbig = dict(refs).get(big["hosts"] - 1)
print("Reading (computed from the figures above):")
print()
print(f"- Hosts: with the same two waves, {two_wave[0]['hosts']} → {big['hosts']} hosts took "
      f"{two_wave[0]['wall']:.0f} → {big['wall']:.0f} ms (×{big['wall'] / two_wave[0]['wall']:.1f}); "
      f"1 → {big['hosts']} hosts, {one['wall']:.0f} → {big['wall']:.0f} ms (×{big['wall'] / one['wall']:.1f}). "
      + ("On this machine the wall clock **does grow with the hosts**."
         if big["wall"] > 1.5 * two_wave[0]["wall"] else "The wall clock stays about flat with the hosts."))
print(f"- Where: in the agents, not in the controller. Summed over the waves, the slowest hosts account for "
      f"{big['agents']:.0f} of the {big['wall']:.0f} ms at {big['hosts']} hosts. In the {big['hosts'] - 1}-host batch "
      f"the slowest host took {big['last_slowest']:.0f} ms, {big['last_start']:.0f} ms of it starting its container "
      f"({big['first_start']:.0f} ms for the canary alone)"
      + (f": the one Docker Engine starts containers largely one after another ({ref1} ms for one container "
         f"alone, {refbig} ms for {big['hosts'] - 1} at once, no agent involved)."
         if ref1 and refbig and refbig > 3 * ref1 else
         f"; the Docker Engine alone: {ref1} ms for one container, {refbig} ms for {big['hosts'] - 1} at once."))
print(f"- The controller: every request of a wave reached its host within {max(0, max(r['reached'] for r in res)):.0f} ms "
      f"of the wave's start; a wave ended at most {max(r['share'] for r in res):.0f} ms after its slowest host; "
      f"its CPU time went {one['cpu_ms']:.0f} → {big['cpu_ms']:.0f} ms and its peak RSS "
      f"{one['rss']:.1f} → {big['rss']:.1f} MiB from 1 to {big['hosts']} hosts; pre-pull + lock "
      f"{one['prepull'] + one['lock']:.0f} → {big['prepull'] + big['lock']:.0f} ms.")
print(f"- Batches: the same {big['hosts']} hosts in {batched['waves']} waves instead of {big['waves']} took "
      f"{batched['wall']:.0f} ms instead of {big['wall']:.0f} ms "
      f"({(batched['wall'] - big['wall']) / (batched['waves'] - big['waves']):+.0f} ms per extra wave): "
      f"a wave costs at least one host's deploy, however few hosts it has.")
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
echo "written to docs/BENCHMARKS.md (between the FLEET markers); ${SECONDS}s after the build"
