# The tools the tests need, each with the Debian package that provides it:
# the one list that scripts/test.sh checks up front (it fails, naming what is
# missing) and .ci/run installs. Sourced by both; not a script to run.

# "COMMAND PACKAGE": a bare COMMAND must be in PATH, or in /usr/sbin or /sbin
# (which a non-root PATH may lack); a path must be an executable file (the
# tests run it by that path).
PREREQUISITES=(
    "docker docker.io"
    "docker-registry docker-registry" # scripts/test-env.sh: the test registries
    "curl curl"                       # scripts/test-env.sh
    "python3 python3"                 # tests/src/harness.rs: edits the audit database
    "/usr/sbin/sshd openssh-server"   # tests/src/sshd.rs: the SSH transport's tests
    "ssh-keygen openssh-client"       # tests/src/sshd.rs (openssh-server depends on it)
    "ip iproute2"
    "systemd-analyze systemd" # agent/tests/service.rs: systemd-analyze verify of the units
    "objdump binutils"        # packaging/build-deb.sh (agent/tests/service.rs builds the .deb)
    "dpkg-deb dpkg"           # packaging/build-deb.sh, packaging/test-deb.sh
)

# missing_prerequisites: prints "PACKAGE WHAT" for each missing tool, WHAT
# naming it; nothing when all are there. The test images need a static
# /bin/busybox (tests/images/build.sh).
missing_prerequisites() {
    local entry cmd pkg
    for entry in "${PREREQUISITES[@]}"; do
        read -r cmd pkg <<<"$entry"
        if [[ "$cmd" == /* ]]; then
            [ -x "$cmd" ] && continue
        else
            command -v "$cmd" >/dev/null 2>&1 && continue
            [ -x "/usr/sbin/$cmd" ] || [ -x "/sbin/$cmd" ] && continue
        fi
        echo "$pkg $cmd"
    done
    if [ ! -x /bin/busybox ]; then
        echo "busybox-static /bin/busybox"
    elif ldd /bin/busybox >/dev/null 2>&1; then
        echo "busybox-static a static /bin/busybox (this one is dynamically linked)"
    fi
}
