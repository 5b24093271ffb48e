#!/usr/bin/env bash
# Builds the test images from busybox-static with `docker import` (no base
# image, nothing pulled from any public registry) and pushes them to the
# local test registries started by scripts/test-env.sh.
#
#   127.0.0.1:5000/demo:v1     healthy: GET / -> "v1\n", GET /health -> 200 "ok",
#                              GET /cgi-bin/slow -> 200 "v1\n" after 2 s
#   127.0.0.1:5000/demo:v2     the same, release "v2"
#   127.0.0.1:5000/demo:v3     broken: a server runs on port 80, but every
#                              request (/ and /health included) answers 500
#   127.0.0.1:5000/demo:crash  serves like a healthy release ("crash\n") for ~5 s, then exits 1
#   127.0.0.1:5000/demo:noport no network service at all (a worker: sleeps)
#   127.0.0.1:5000/demo:sick   healthy ("sick\n"), then /health answers 404 from 10 s after start
#   127.0.0.1:5000/demo:flaky  healthy; GET /cgi-bin/flaky answers 500 on about 1 request in 5
#   127.0.0.1:5001/demo:v1     = demo:v1, behind basic auth (deployer / s3cret)
#   127.0.0.1:5001/private:v1  = demo:v1, behind basic auth; never pulled with
#                              good credentials by the tests, so that a pull
#                              without them cannot be served from a local copy
#
# Every server in them listens through /bin/tcpserve (files/tcpserve.rs, built
# here with the workspace's rustc, statically linked): busybox httpd's own
# listen backlog is 9 and nc's is 1, which overflow when the host's CPUs are
# busy and cost a request a one-second SYN retransmission (see tcpserve.rs).
#
# Idempotent: an image is rebuilt only when its build inputs (this script,
# files/, the busybox binary) changed; pushes of unchanged images are no-ops.
# The 5001 copies are removed from the local engine after the push.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REGISTRY="${REGISTRY:-127.0.0.1:5000}"
AUTH_REGISTRY="${AUTH_REGISTRY:-127.0.0.1:5001}"
AUTH_USER="${AUTH_USER:-deployer}"
AUTH_PASSWORD="${AUTH_PASSWORD:-s3cret}"
BUSYBOX="${BUSYBOX:-/bin/busybox}"
IMAGES="v1 v2 v3 crash noport sick flaky"

die() { echo "tests/images/build.sh: $*" >&2; exit 1; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

[ -x "$BUSYBOX" ] || die "$BUSYBOX not found: install busybox-static (apt-get install busybox-static)"
if ldd "$BUSYBOX" >/dev/null 2>&1; then
    die "$BUSYBOX is dynamically linked; the images need a static busybox: apt-get install busybox-static"
fi
docker info >/dev/null 2>&1 || die "the Docker daemon does not answer (docker info failed): start dockerd"

# One hash over every build input; stored as a label on each image.
inputs_hash() {
    {
        cat "$HERE/build.sh"
        (cd "$HERE/files" && for f in $(ls | sort); do echo "== $f"; cat "$f"; done)
        sha256sum <"$BUSYBOX"
    } | sha256sum | cut -c1-16
}
HASH="$(inputs_hash)"

# The images' TCP server, built once per run, when an image needs it.
TCPSERVE="$WORK/tcpserve"
build_tcpserve() {
    [ -x "$TCPSERVE" ] && return
    command -v rustc >/dev/null || die "rustc not found: the images' tcpserve is built with the Rust toolchain that builds this workspace"
    rustc --edition 2024 -O -C panic=abort -C strip=symbols \
        -C target-feature=+crt-static -C relocation-model=static \
        -o "$TCPSERVE" "$HERE/files/tcpserve.rs" ||
        die "cannot build files/tcpserve.rs as a static binary (it needs glibc's static libraries: apt-get install libc6-dev)"
    if ldd "$TCPSERVE" >/dev/null 2>&1; then
        die "files/tcpserve.rs was linked dynamically; the images need a static binary"
    fi
}

# make_rootfs DIR NAME: the root filesystem of demo:NAME.
make_rootfs() {
    local root="$1" name="$2"
    mkdir -p "$root"/{bin,etc,tmp,www/cgi-bin,proc,sys,dev}
    chmod 1777 "$root/tmp"
    cp "$BUSYBOX" "$root/bin/busybox"
    local applet
    for applet in $("$BUSYBOX" --list); do
        [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
    install -m 0755 "$HERE/files/slow.cgi" "$root/www/cgi-bin/slow"
    install -m 0755 "$TCPSERVE" "$root/bin/tcpserve"
    local start=start-httpd
    case "$name" in
        v1 | v2)
            printf '%s\n' "$name" >"$root/etc/release"
            printf '%s\n' "$name" >"$root/www/index.html"
            printf 'ok' >"$root/www/health"
            ;;
        v3)
            printf 'v3\n' >"$root/etc/release"
            install -m 0755 "$HERE/files/fail500" "$root/bin/fail500"
            start=start-broken
            ;;
        crash)
            printf 'crash\n' >"$root/etc/release"
            printf 'crash\n' >"$root/www/index.html"
            printf 'ok' >"$root/www/health"
            start=start-crash
            ;;
        noport)
            printf 'noport\n' >"$root/etc/release"
            start=start-idle
            ;;
        sick)
            printf 'sick\n' >"$root/etc/release"
            printf 'sick\n' >"$root/www/index.html"
            printf 'ok' >"$root/www/health"
            start=start-sick
            ;;
        flaky)
            printf 'flaky\n' >"$root/etc/release"
            printf 'flaky\n' >"$root/www/index.html"
            printf 'ok' >"$root/www/health"
            install -m 0755 "$HERE/files/flaky.cgi" "$root/www/cgi-bin/flaky"
            ;;
        *) die "unknown image $name" ;;
    esac
    install -m 0755 "$HERE/files/$start" "$root/bin/start"
}

build_one() {
    local name="$1" ref="$REGISTRY/demo:$1"
    local have
    have="$(docker image inspect --format '{{ index .Config.Labels "io.deploy-testkit.inputs" }}' "$ref" 2>/dev/null || true)"
    if [ "$have" = "$HASH" ]; then
        echo "image $ref is up to date"
        return
    fi
    local old root
    old="$(docker image inspect --format '{{.Id}}' "$ref" 2>/dev/null || true)"
    build_tcpserve
    root="$(mktemp -d)"
    make_rootfs "$root" "$name"
    local expose=(--change 'EXPOSE 80')
    [ "$name" = noport ] && expose=()
    tar --numeric-owner --owner=0 --group=0 -C "$root" -c . |
        docker import \
            --change 'CMD ["/bin/start"]' \
            --change 'ENV PATH=/bin' \
            --change 'WORKDIR /' \
            "${expose[@]}" \
            --change "LABEL io.deploy-testkit.inputs=$HASH io.deploy-testkit.release=$name" \
            - "$ref" >/dev/null
    rm -rf "$root"
    # The image this one replaces, unless something still uses it.
    [ -z "$old" ] || docker rmi "$old" >/dev/null 2>&1 || true
    echo "built $ref"
}

for name in $IMAGES; do
    build_one "$name"
done
for name in $IMAGES; do
    docker push --quiet "$REGISTRY/demo:$name" >/dev/null || die "docker push $REGISTRY/demo:$name failed"
done
echo "pushed demo:{${IMAGES// /,}} to $REGISTRY"

if [ "${SKIP_AUTH_REGISTRY:-0}" != 1 ]; then
    # Log in with a throw-away Docker config: the user's ~/.docker/config.json
    # must not learn these credentials (the tests expect a pull without them
    # to fail).
    tmpcfg="$WORK/docker-config"
    mkdir "$tmpcfg"
    if ! printf '%s' "$AUTH_PASSWORD" | DOCKER_CONFIG="$tmpcfg" docker login --username "$AUTH_USER" --password-stdin "$AUTH_REGISTRY" >"$tmpcfg/login.log" 2>&1; then
        cat "$tmpcfg/login.log" >&2
        die "docker login to $AUTH_REGISTRY failed"
    fi
    for repo in demo private; do
        docker tag "$REGISTRY/demo:v1" "$AUTH_REGISTRY/$repo:v1"
        DOCKER_CONFIG="$tmpcfg" docker push --quiet "$AUTH_REGISTRY/$repo:v1" >/dev/null || die "docker push $AUTH_REGISTRY/$repo:v1 failed"
        docker rmi "$AUTH_REGISTRY/$repo:v1" >/dev/null
    done
    echo "pushed demo:v1 and private:v1 to $AUTH_REGISTRY (basic auth)"
fi
