#!/usr/bin/env bash
# The test command (README): unit tests and the end-to-end tests against the
# real Docker Engine and local registries.
#
#   scripts/test.sh [extra arguments for cargo nextest run / cargo test]
#
# Needs: a running Docker daemon, docker-registry, busybox-static, curl,
# python3, cargo (cargo-nextest if present). Fails with a clear message when
# any is missing; .ci/run installs them on a fresh machine.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$1 ($2)"); }
need docker "apt-get install docker.io"
need docker-registry "apt-get install docker-registry"
need curl "apt-get install curl"
need python3 "apt-get install python3"
need cargo "install the Rust toolchain (rustup)"
if [ ! -x /bin/busybox ]; then
    missing+=("/bin/busybox (apt-get install busybox-static)")
elif ldd /bin/busybox >/dev/null 2>&1; then
    missing+=("a static /bin/busybox (apt-get install busybox-static)")
fi
if command -v docker >/dev/null 2>&1 && ! docker info >/dev/null 2>&1; then
    missing+=("a running Docker daemon: 'docker info' fails (start it: dockerd >/var/log/dockerd.log 2>&1 &)")
fi
if [ "${#missing[@]}" -gt 0 ]; then
    echo "scripts/test.sh: cannot run the tests, missing:" >&2
    for m in "${missing[@]}"; do echo "  - $m" >&2; done
    exit 1
fi

echo "==> test environment (registries, test images)"
bash scripts/test-env.sh

echo "==> cargo build --workspace --all-targets"
cargo build --workspace --all-targets

start=$(date +%s)
if cargo nextest --version >/dev/null 2>&1; then
    echo "==> cargo nextest run --workspace --no-fail-fast"
    status=0
    cargo nextest run --workspace --no-fail-fast "$@" || status=$?
else
    echo "==> cargo-nextest not found: cargo test --workspace --no-fail-fast (e2e tests 2 at a time)"
    status=0
    cargo test --workspace --no-fail-fast "$@" -- --test-threads=2 || status=$?
fi
echo "==> tests took $(($(date +%s) - start)) s"
exit "$status"
