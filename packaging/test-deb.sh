#!/usr/bin/env bash
# Builds the .deb, checks its fields and contents, installs it on this
# machine with dpkg -i, checks that everything lands where the units expect
# it (binaries, user, directories, permissions, nothing enabled), runs
# `systemd-analyze verify` on the installed units, upgrades it in place,
# then removes and purges it and checks that nothing is left but the state
# directory (kept on purge on purpose: it holds the audit log).
#
#   packaging/test-deb.sh [--profile debug|release] [--no-build]
#
# Default: package the debug binaries, building them if needed (the test
# suite has them already: agent/tests/service.rs passes --no-build). Needs
# root (dpkg -i), dpkg-deb, objdump and systemd-analyze: it fails, naming
# what is missing, rather than skip a check.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

fail() { echo "packaging/test-deb.sh: FAIL: $*" >&2; exit 1; }
ok() { echo "ok: $*"; }

profile=debug
build_args=()
while [ $# -gt 0 ]; do
	case "$1" in
	--profile) profile=${2:?}; shift 2 ;;
	--no-build) build_args+=(--no-build); shift ;;
	*) fail "unknown argument '$1'" ;;
	esac
done

[ "$(id -u)" = 0 ] || fail "must run as root: it installs the package with dpkg -i (CI runs as root)"
for tool in dpkg dpkg-deb objdump systemd-analyze getent runuser; do
	command -v "$tool" >/dev/null 2>&1 ||
		fail "$tool not found (apt-get install dpkg binutils systemd passwd util-linux)"
done
if dpkg-query -W -f='${Status}' deploy-agent 2>/dev/null | grep -q 'install ok installed'; then
	fail "deploy-agent is already installed on this machine; this test installs and removes it: remove it first (dpkg -r deploy-agent)"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/deploy-agent-deb-test.XXXXXX")
cleanup() {
	# Leave the machine as we found it, whatever failed.
	if dpkg-query -W -f='${Status}' deploy-agent 2>/dev/null | grep -q 'installed'; then
		dpkg --purge deploy-agent >/dev/null 2>&1 || true
	fi
	rm -rf "$work"
}
trap cleanup EXIT

version=$(awk '
	/^\[/ { section = $0 }
	section == "[workspace.package]" && /^version[[:space:]]*=/ {
		gsub(/.*=[[:space:]]*"|".*/, ""); print; exit
	}' Cargo.toml)
arch=$(dpkg --print-architecture)

echo "==> packaging/build-deb.sh --profile $profile ${build_args[*]}"
deb=$(packaging/build-deb.sh --profile "$profile" "${build_args[@]}" --out "$work" | tail -1)
[ -f "$deb" ] || fail "build-deb.sh did not produce a .deb (last line: '$deb')"
[ "$(basename "$deb")" = "deploy-agent_${version}_${arch}.deb" ] ||
	fail "unexpected file name $(basename "$deb")"
ok "built $(basename "$deb") ($(du -h "$deb" | cut -f1))"

# ---- control fields ---------------------------------------------------------
field() { dpkg-deb -f "$deb" "$1"; }
[ "$(field Package)" = deploy-agent ] || fail "Package is '$(field Package)'"
[ "$(field Version)" = "$version" ] || fail "Version is '$(field Version)', Cargo.toml says $version"
[ "$(field Architecture)" = "$arch" ] || fail "Architecture is '$(field Architecture)'"
field Depends | grep -q 'libc6 (>= 2\.[0-9]*)' || fail "Depends lacks a versioned libc6: '$(field Depends)'"
[ "$(field Recommends)" = "docker.io | docker-ce | docker-engine" ] ||
	fail "Recommends is '$(field Recommends)'"
field Maintainer | grep -q '@' || fail "no Maintainer"
field Description | grep -q 'enables and starts nothing' || fail "the description does not say it enables nothing"
dpkg-deb -I "$deb" >"$work/info"
for script in postinst prerm postrm conffiles; do
	grep -q " $script" "$work/info" || fail "the package has no $script ($(cat "$work/info"))"
done
ok "control fields: $(field Package) $(field Version) $(field Architecture); Depends: $(field Depends)"

# ---- contents -----------------------------------------------------------------
dpkg-deb -c "$deb" | awk '{ print $1, $2, $6 }' >"$work/contents"
expect() { # MODE OWNER PATH
	grep -qxF -e "$1 $2 ./$3" "$work/contents" ||
		fail "the package lacks $3 as $1 $2; it has: $(grep -F -e "$3" "$work/contents" || echo nothing)"
}
expect -rwxr-xr-x root/root usr/bin/deploy-agent
expect -rwxr-xr-x root/root usr/bin/deploy-controller
expect -rw-r--r-- root/root lib/systemd/system/deploy-agent.service
expect -rw-r--r-- root/root lib/systemd/system/deploy-proxy.service
expect -rw-r--r-- root/root usr/lib/sysusers.d/deploy-agent.conf
expect -rw-r--r-- root/root usr/lib/tmpfiles.d/deploy-agent.conf
expect -rw-r----- root/root etc/deploy-agent/agent.toml
expect -rwxr-xr-x root/root usr/share/deploy-agent/deploy.sh
for doc in README.md configuration.md operations.md copyright examples/production.env; do
	expect -rw-r--r-- root/root "usr/share/doc/deploy-agent/$doc"
done
if grep -E ' \./(etc/systemd|lib/systemd/system/[^ ]*\.wants)/' "$work/contents"; then
	fail "the package ships enablement symlinks: it must enable nothing"
fi
dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles >"$work/conffiles"
[ "$(cat "$work/conffiles")" = /etc/deploy-agent/agent.toml ] ||
	fail "conffiles is '$(cat "$work/conffiles")'"
ok "contents: $(wc -l <"$work/contents") entries, agent.toml is a conffile"

# ---- install ----------------------------------------------------------------------
echo "==> dpkg -i"
dpkg -i "$deb" >"$work/install.log" 2>&1 || { cat "$work/install.log" >&2; fail "dpkg -i failed"; }
grep -q "Nothing was enabled or started" "$work/install.log" ||
	fail "postinst did not tell how to enable the units: $(cat "$work/install.log")"

getent passwd deploy-agent >/dev/null || fail "no deploy-agent user after install"
IFS=: read -r _ _ _ _ _ home shell < <(getent passwd deploy-agent)
[ "$home" = /var/lib/deploy-agent ] || fail "deploy-agent's home is $home"
[ "$shell" = /usr/sbin/nologin ] || fail "deploy-agent's shell is $shell"
[ "$(id -gn deploy-agent)" = deploy-agent ] || fail "deploy-agent's group is $(id -gn deploy-agent)"
id -Gn deploy-agent | tr ' ' '\n' | grep -qx docker || fail "deploy-agent is not in the docker group: $(id -Gn deploy-agent)"
ok "user deploy-agent (groups: $(id -Gn deploy-agent))"

mode_owner() { stat -c '%a %U:%G' "$1"; }
[ "$(mode_owner /var/lib/deploy-agent)" = "750 deploy-agent:deploy-agent" ] ||
	fail "/var/lib/deploy-agent is $(mode_owner /var/lib/deploy-agent)"
[ "$(mode_owner /etc/deploy-agent)" = "750 root:deploy-agent" ] ||
	fail "/etc/deploy-agent is $(mode_owner /etc/deploy-agent)"
[ "$(mode_owner /etc/deploy-agent/environments)" = "750 root:deploy-agent" ] ||
	fail "/etc/deploy-agent/environments is $(mode_owner /etc/deploy-agent/environments)"
[ "$(mode_owner /etc/deploy-agent/agent.toml)" = "640 root:deploy-agent" ] ||
	fail "/etc/deploy-agent/agent.toml is $(mode_owner /etc/deploy-agent/agent.toml)"
ok "directories and agent.toml permissions"

# Every program a unit runs exists and is executable, and the unit's own
# paths agree with what was installed.
for unit in deploy-agent deploy-proxy; do
	file=/lib/systemd/system/$unit.service
	[ -f "$file" ] || fail "$file not installed"
	grep -E '^Exec(Start|StartPre)=' "$file" | while IFS= read -r line; do
		prog=${line#*=}
		prog=${prog%% *}
		prog=${prog#[-@+!]}
		[ -x "$prog" ] || fail "$unit: $line: $prog is not an executable file"
		echo "ok: $unit runs $prog"
	done
	for path in $(grep -E '^(ReadWritePaths|StateDirectory)=' "$file" | cut -d= -f2-); do
		case "$path" in
		/*) [ -d "$path" ] || fail "$unit: $path does not exist" ;;
		*) [ -d "/var/lib/$path" ] || fail "$unit: StateDirectory $path: /var/lib/$path does not exist" ;;
		esac
	done
	user=$(sed -n 's/^User=//p' "$file")
	[ "$user" = deploy-agent ] || fail "$unit runs as '$user'"
done
[ "$(/usr/bin/deploy-agent --version | awk '{ print $2 }')" = "$version" ] ||
	fail "/usr/bin/deploy-agent --version: $(/usr/bin/deploy-agent --version)"
# The unit's ExecStartPre, as the unit's user: the service user can read its config.
runuser -u deploy-agent -- /usr/bin/deploy-agent check-config --config /etc/deploy-agent/agent.toml >"$work/check" 2>&1 ||
	fail "check-config as deploy-agent failed: $(cat "$work/check")"
ok "$(cat "$work/check")"
/usr/share/deploy-agent/deploy.sh 2>"$work/usage" && fail "deploy.sh without arguments succeeded"
grep -q "usage: deploy.sh" "$work/usage" || fail "deploy.sh usage: $(cat "$work/usage")"

echo "==> systemd-analyze verify (installed units)"
systemd-analyze verify /lib/systemd/system/deploy-agent.service /lib/systemd/system/deploy-proxy.service >"$work/verify" 2>&1 ||
	{ cat "$work/verify" >&2; fail "systemd-analyze verify failed on the installed units"; }
[ ! -s "$work/verify" ] || { cat "$work/verify" >&2; fail "systemd-analyze verify printed warnings"; }
ok "systemd-analyze verify"

for wants in /etc/systemd/system/*.wants; do
	[ -d "$wants" ] || continue
	if ls "$wants" | grep -q '^deploy-'; then
		fail "installing enabled something: $(ls -l "$wants" | grep deploy-)"
	fi
done
ok "nothing enabled"

# ---- upgrade in place (postinst configure with the old version) --------------------
echo "# a local edit" >>/etc/deploy-agent/agent.toml
echo "==> dpkg -i again (upgrade path)"
dpkg -i --force-confold "$deb" >"$work/upgrade.log" 2>&1 || { cat "$work/upgrade.log" >&2; fail "reinstall failed"; }
tail -1 /etc/deploy-agent/agent.toml | grep -q "a local edit" || fail "the upgrade overwrote the edited conffile"
ok "upgrade keeps the edited agent.toml"

# ---- remove, purge ---------------------------------------------------------------------
echo "==> dpkg -r"
dpkg -r deploy-agent >"$work/remove.log" 2>&1 || { cat "$work/remove.log" >&2; fail "dpkg -r failed"; }
for f in /usr/bin/deploy-agent /usr/bin/deploy-controller /lib/systemd/system/deploy-agent.service \
	/lib/systemd/system/deploy-proxy.service /usr/lib/sysusers.d/deploy-agent.conf \
	/usr/lib/tmpfiles.d/deploy-agent.conf /usr/share/deploy-agent/deploy.sh; do
	[ ! -e "$f" ] || fail "$f is still there after dpkg -r"
done
[ -f /etc/deploy-agent/agent.toml ] || fail "dpkg -r removed the conffile (only purge should)"
ok "removed; agent.toml kept until purge"
echo "==> dpkg -P"
dpkg -P deploy-agent >"$work/purge.log" 2>&1 || { cat "$work/purge.log" >&2; fail "dpkg -P failed"; }
[ ! -e /etc/deploy-agent ] || fail "/etc/deploy-agent is still there after purge: $(ls -la /etc/deploy-agent)"
[ -d /var/lib/deploy-agent ] || fail "purge removed /var/lib/deploy-agent (the audit log must be kept)"
dpkg-query -W -f='${Status}' deploy-agent 2>/dev/null | grep -q 'installed' &&
	fail "dpkg still lists deploy-agent as installed"
ok "purged; /var/lib/deploy-agent kept"
echo "packaging/test-deb.sh: all checks passed"
