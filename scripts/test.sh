#!/usr/bin/env bash
# The test command (README): unit tests and the end-to-end tests against the
# real Docker Engine and local registries.
#
#   scripts/test.sh [extra arguments for cargo nextest run / cargo test]
#
# Needs: cargo (cargo-nextest if present), a running Docker daemon and the
# tools listed in scripts/prerequisites.sh (docker-registry, busybox-static,
# sshd, systemd-analyze, objdump, dpkg-deb, ...). Fails up front, naming
# everything missing and its Debian package; .ci/run installs them on a
# fresh machine.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# shellcheck source=scripts/prerequisites.sh
. "$ROOT/scripts/prerequisites.sh"
missing=()
packages=()
while read -r pkg what; do
    missing+=("$what (apt-get install $pkg)")
    packages+=("$pkg")
done < <(missing_prerequisites)
command -v cargo >/dev/null 2>&1 || missing+=("cargo (install the Rust toolchain: rustup)")
if command -v docker >/dev/null 2>&1 && ! docker info >/dev/null 2>&1; then
    missing+=("a running Docker daemon: 'docker info' fails (start it: dockerd >/var/log/dockerd.log 2>&1 &)")
fi
if [ "${#missing[@]}" -gt 0 ]; then
    echo "scripts/test.sh: cannot run the tests, missing:" >&2
    for m in "${missing[@]}"; do echo "  - $m" >&2; done
    if [ "${#packages[@]}" -gt 0 ]; then
        echo "Install with: apt-get install ${packages[*]} (or run .ci/run, which installs them and starts dockerd)" >&2
    fi
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
