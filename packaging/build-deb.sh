#!/usr/bin/env bash
# Builds the deploy-agent .deb from a staging directory with `dpkg-deb
# --build`: what `cargo deb` would produce, without installing cargo-deb or
# compiling anything beyond the workspace's own binaries.
#
#   packaging/build-deb.sh [--profile release|debug] [--no-build] [--out DIR]
#
#   --profile   which cargo profile's binaries to package (default release:
#               what you ship; the tests package the debug build they
#               already have, to spare a second compile)
#   --no-build  package the binaries already in target/PROFILE (fail if absent)
#   --out DIR   where the .deb goes (default target/debian)
#
# Prints the path of the .deb on its last line. Needs dpkg-deb and objdump
# (binutils, for the libc6 version the binaries need).
#
# The package installs:
#   /usr/bin/deploy-agent, /usr/bin/deploy-controller
#   /lib/systemd/system/deploy-agent.service, deploy-proxy.service
#   /usr/lib/sysusers.d/deploy-agent.conf, /usr/lib/tmpfiles.d/deploy-agent.conf
#   /etc/deploy-agent/agent.toml (a conffile: local edits survive upgrades)
#   /usr/share/deploy-agent/deploy.sh
#   /usr/share/doc/deploy-agent/ (README, configuration, operations, copyright, an example environment file)
# and enables nothing (see packaging/debian/postinst).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

die() { echo "packaging/build-deb.sh: $*" >&2; exit 1; }

profile=release
build=1
out="$ROOT/target/debian"
while [ $# -gt 0 ]; do
	case "$1" in
	--profile) profile=${2:?--profile needs release or debug}; shift 2 ;;
	--no-build) build=0; shift ;;
	--out) out=${2:?--out needs a directory}; shift 2 ;;
	*) die "unknown argument '$1' (see the header of this script)" ;;
	esac
done
case "$profile" in
release) cargo_profile=(--release) ;;
debug) cargo_profile=() ;;
*) die "--profile must be release or debug, not '$profile'" ;;
esac

for tool in dpkg-deb dpkg objdump; do
	command -v "$tool" >/dev/null 2>&1 || die "$tool not found (apt-get install dpkg binutils)"
done

# The version is the workspace's ([workspace.package] version in Cargo.toml).
version=$(awk '
	/^\[/ { section = $0 }
	section == "[workspace.package]" && /^version[[:space:]]*=/ {
		gsub(/.*=[[:space:]]*"|".*/, ""); print; exit
	}' Cargo.toml)
[ -n "$version" ] || die "no version under [workspace.package] in Cargo.toml"
arch=$(dpkg --print-architecture)

target_dir=${CARGO_TARGET_DIR:-$ROOT/target}
bin_dir="$target_dir/$profile"
if [ "$build" = 1 ]; then
	echo "==> cargo build ${cargo_profile[*]} -p deploy-agent -p deploy-controller" >&2
	cargo build "${cargo_profile[@]}" -p deploy-agent -p deploy-controller >&2
fi
for b in deploy-agent deploy-controller; do
	[ -x "$bin_dir/$b" ] || die "$bin_dir/$b is missing: build it (cargo build ${cargo_profile[*]} --workspace) or drop --no-build"
done
# A stale binary would ship the wrong version under the right name.
reported=$("$bin_dir/deploy-agent" --version)
case "$reported" in
"deploy-agent $version "*) ;;
*) die "$bin_dir/deploy-agent --version says '$reported', not version $version: rebuild it" ;;
esac

# The highest glibc symbol version the binaries use is the libc6 they need.
glibc=$(objdump -T "$bin_dir/deploy-agent" "$bin_dir/deploy-controller" |
	grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
[ -n "$glibc" ] || die "cannot tell which glibc $bin_dir/deploy-agent needs (objdump -T found no GLIBC_ symbol)"

stage=$(mktemp -d "${TMPDIR:-/tmp}/deploy-agent-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT
pkg="$stage/deploy-agent_${version}_${arch}"

install -d -m 0755 "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/lib/systemd/system" \
	"$pkg/usr/lib/sysusers.d" "$pkg/usr/lib/tmpfiles.d" "$pkg/etc/deploy-agent" \
	"$pkg/usr/share/deploy-agent" "$pkg/usr/share/doc/deploy-agent/examples"
install -m 0755 "$bin_dir/deploy-agent" "$bin_dir/deploy-controller" "$pkg/usr/bin/"
if [ "$profile" = release ] && command -v strip >/dev/null 2>&1; then
	strip --strip-unneeded "$pkg/usr/bin/deploy-agent" "$pkg/usr/bin/deploy-controller"
fi
install -m 0644 systemd/deploy-agent.service systemd/deploy-proxy.service "$pkg/lib/systemd/system/"
install -m 0644 systemd/deploy-agent.sysusers "$pkg/usr/lib/sysusers.d/deploy-agent.conf"
install -m 0644 systemd/deploy-agent.tmpfiles "$pkg/usr/lib/tmpfiles.d/deploy-agent.conf"
# postinst makes it root:deploy-agent 0640 (it may hold registry passwords).
install -m 0640 packaging/agent.toml "$pkg/etc/deploy-agent/agent.toml"
install -m 0755 scripts/deploy.sh "$pkg/usr/share/deploy-agent/deploy.sh"
install -m 0644 README.md docs/configuration.md docs/operations.md "$pkg/usr/share/doc/deploy-agent/"
install -m 0644 packaging/debian/copyright "$pkg/usr/share/doc/deploy-agent/copyright"
install -m 0644 packaging/example.env "$pkg/usr/share/doc/deploy-agent/examples/production.env"
install -m 0755 packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm "$pkg/DEBIAN/"
echo /etc/deploy-agent/agent.toml >"$pkg/DEBIAN/conffiles"

installed_size=$(du -k -s --exclude=DEBIAN "$pkg" | cut -f1)
cat >"$pkg/DEBIAN/control" <<EOF
Package: deploy-agent
Version: $version
Architecture: $arch
Maintainer: deploy-agent maintainers <deploy-agent@example.invalid>
Installed-Size: $installed_size
Depends: libc6 (>= $glibc), libgcc-s1, passwd
Recommends: docker.io | docker-ce | docker-engine
Section: admin
Priority: optional
Homepage: https://example.invalid/deploy-agent
Description: health-gated, zero-downtime deploys of Docker compose projects
 deploy-agent runs on every host: it pulls images through the Docker API,
 pins them to their digests, starts the new release beside the old one,
 waits for its health gate, switches traffic in its own proxy and keeps the
 previous releases so that a rollback needs no registry. deploy-controller
 sequences a whole environment over mutual TLS.
 .
 This package installs the binaries, the systemd units deploy-agent.service
 and deploy-proxy.service, a default /etc/deploy-agent/agent.toml and the
 deploy-agent system user. It enables and starts nothing.
EOF

mkdir -p "$out"
deb="$out/deploy-agent_${version}_${arch}.deb"
# Release packages get xz; a debug build (60 MB of tests' binaries) gzip -1.
if [ "$profile" = release ]; then
	compress=(-Zxz)
else
	compress=(-Zgzip -z1)
fi
dpkg-deb --root-owner-group "${compress[@]}" --build "$pkg" "$deb" >&2
echo "$deb"
