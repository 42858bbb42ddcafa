#!/usr/bin/env bash
# Builds the Debian package and checks it end to end:
#   1. a release build, then `cargo deb`;
#   2. lintian: no error and no warning that packaging/gatehouse.lintian-overrides does
#      not explain;
#   3. the unit's exposure score (`systemd-analyze security --offline=true`) at most 1.5;
#   4. every file the package installs, with its owner and mode, and the conffile;
#   5. the maintainer scripts, run by dpkg against a throwaway root
#      (dpkg --root --force-script-chrootless, which sets DPKG_ROOT): install creates
#      the master key (0600) and enables the unit; a second run and an upgrade keep
#      the key; remove keeps everything; purge keeps the data and the key unless
#      GATEHOUSE_PURGE_DATA=yes;
#   6. the installed binary serving as an unprivileged user with the directories
#      systemd would give it, pairing a device over HTTPS (the self-signed certificate
#      trusted by its fetched copy, checked against the printed SPKI pin), and
#      stopping cleanly on SIGTERM.
# Needs root (dpkg --root, setpriv), cargo-deb, lintian, systemd-analyze, curl, openssl.
# .ci/run installs them. KEEP_WORK=1 keeps the throwaway directory.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
export LC_ALL=C.UTF-8

MAX_EXPOSURE=1.5
started=$(date +%s)
server_pid=
work=

say() { echo "== package: $*"; }
info() { echo "   $*"; }
fail() {
    echo "package test FAILED: $*" >&2
    exit 1
}
cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -KILL "$server_pid" 2>/dev/null || true
    fi
    if [ -n "$work" ] && [ -d "$work" ]; then
        if [ "${KEEP_WORK:-}" = 1 ]; then
            echo "   kept $work"
        else
            rm -rf -- "$work"
        fi
    fi
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------
say "tools"
[ "$(id -u)" = 0 ] || fail "run as root: dpkg --root installs root-owned files and setpriv drops to nobody"
for tool in cargo cargo-deb lintian systemd-analyze dpkg dpkg-deb setpriv curl openssl od sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || fail "missing $tool (.ci/run installs it: see its package step)"
done
id nobody >/dev/null 2>&1 || fail "no user 'nobody' to run the server as"
info "$(cargo deb --version), $(lintian --version), $(systemd-analyze --version | head -n 1)"

work=$(mktemp -d "${TMPDIR:-/tmp}/gatehouse-deb.XXXXXXXX")
# The server runs as nobody and must reach the installed files under this directory.
chmod 0755 "$work"

# ---------------------------------------------------------------------------------------
say "release build and cargo deb"
t=$(date +%s)
cargo build --release --locked --bin gatehouse
mkdir -p target/debian
cargo deb --no-build --locked --output target/debian/ >"$work/cargo-deb.out" ||
    fail "cargo deb failed"
deb=$(tail -n 1 "$work/cargo-deb.out")
[ -f "$deb" ] || fail "cargo deb printed no package path (got '$deb')"
version=$(dpkg-deb --field "$deb" Version)
info "built $deb (version $version) in $(($(date +%s) - t)) s"

changelog_version=$(sed -n '1s/^gatehouse (\([^)]*\)).*/\1/p' packaging/changelog)
[ "$changelog_version" = "$version" ] ||
    fail "packaging/changelog starts with version '$changelog_version' but the package is $version: add a changelog entry"

# ---------------------------------------------------------------------------------------
say "lintian"
# Overridden tags do not count. --show-overrides would make lintian count them, so the
# overrides are listed separately below.
set +e
lintian --display-info --fail-on error,warning "$deb" >"$work/lintian.out" 2>"$work/lintian.err"
lintian_rc=$?
set -e
sed 's/^/   /' "$work/lintian.out"
grep -v 'running with root privileges' "$work/lintian.err" | sed 's/^/   /' || true
if [ "$lintian_rc" -ne 0 ] || grep -Eq '^[EW]: ' "$work/lintian.out"; then
    fail "lintian reported an error or a warning (exit code $lintian_rc); fix it or, if it is expected, override it in packaging/gatehouse.lintian-overrides with a one-line reason"
fi
overridden=$(grep -c '^gatehouse: ' packaging/gatehouse.lintian-overrides || true)
info "lintian: no errors, no unoverridden warnings ($overridden overrides, each with its reason)"

# ---------------------------------------------------------------------------------------
say "systemd-analyze security --offline=true systemd/gatehouse.service"
analyze_rc=0
systemd-analyze security --offline=true --no-pager systemd/gatehouse.service \
    >"$work/analyze.out" 2>&1 || analyze_rc=$?
exposure=$(sed -n 's/.*Overall exposure level for [^:]*: *\([0-9][0-9.]*\).*/\1/p' "$work/analyze.out" | head -n 1)
if [ -z "$exposure" ]; then
    cat "$work/analyze.out" >&2
    fail "no 'Overall exposure level' line from systemd-analyze (exit code $analyze_rc)"
fi
grep -E '^✗' "$work/analyze.out" | sed 's/^/   /' || true
if ! awk -v e="$exposure" -v max="$MAX_EXPOSURE" 'BEGIN { exit !(e + 0 <= max + 0) }'; then
    fail "the unit's exposure level is $exposure, above $MAX_EXPOSURE (the lines marked ✗ above are what raise it)"
fi
info "exposure level $exposure (at most $MAX_EXPOSURE)"

# ---------------------------------------------------------------------------------------
say "contents"
# path, mode: every file the package must install, owned by root.
expected_files="
usr/bin/gatehouse 755
usr/lib/systemd/system/gatehouse.service 644
etc/gatehouse/gatehouse.toml 644
usr/share/man/man1/gatehouse.1.gz 644
usr/share/doc/gatehouse/copyright 644
usr/share/doc/gatehouse/changelog.Debian.gz 644
usr/share/doc/gatehouse/README.md 644
usr/share/doc/gatehouse/HARDENING.md 644
usr/share/doc/gatehouse/schema/openapi.yaml 644
usr/share/lintian/overrides/gatehouse 644
"
for doc in schema/*.md; do
    expected_files="$expected_files
usr/share/doc/gatehouse/$doc 644"
done

check_files() { # check_files ROOT WHAT
    local root=$1 what=$2 path mode got
    while read -r path mode; do
        [ -n "$path" ] || continue
        [ -f "$root/$path" ] || fail "$what: /$path is missing"
        got=$(stat -c '%a %U:%G' "$root/$path")
        [ "$got" = "$mode root:root" ] || fail "$what: /$path is '$got', expected '$mode root:root'"
    done <<<"$expected_files"
}

dpkg-deb --extract "$deb" "$work/extracted"
check_files "$work/extracted" "dpkg-deb -x"
count=$(grep -c . <<<"$expected_files")
actual=$(find "$work/extracted" -type f | wc -l)
[ "$actual" -eq "$count" ] || {
    find "$work/extracted" -type f | sed "s|^$work/extracted||" | sort >&2
    fail "the package holds $actual files, expected $count: update expected_files in this script or the assets in Cargo.toml"
}
cmp -s "$work/extracted/usr/lib/systemd/system/gatehouse.service" systemd/gatehouse.service ||
    fail "the packaged unit differs from systemd/gatehouse.service"
cmp -s "$work/extracted/etc/gatehouse/gatehouse.toml" packaging/gatehouse.toml ||
    fail "the packaged configuration differs from packaging/gatehouse.toml"
# Every setting commented out, except the three paths that say where the package keeps
# things (so that commands typed as root find the service's files).
if grep -Env '^[[:space:]]*(#.*|\[[a-z_]+\][[:space:]]*|(data|master_key_file|socket) = "[^"]*")?$' \
    packaging/gatehouse.toml >&2; then
    fail "packaging/gatehouse.toml sets a value (the lines above): settings other than data, master_key_file and admin.socket must stay commented out"
fi
dpkg-deb --control "$deb" "$work/control"
[ "$(cat "$work/control/conffiles")" = "/etc/gatehouse/gatehouse.toml" ] ||
    fail "conffiles is '$(tr '\n' ' ' <"$work/control/conffiles")', expected exactly /etc/gatehouse/gatehouse.toml"
for script in postinst prerm postrm; do
    [ -x "$work/control/$script" ] || fail "the package has no executable $script"
    sh -n "$work/control/$script" || fail "$script: sh -n found a syntax error"
    if command -v shellcheck >/dev/null 2>&1; then
        shellcheck -s sh "$work/control/$script" || fail "$script: shellcheck found problems"
    fi
done
info "$count files with their modes, the conffile, and the maintainer scripts (sh -n$(command -v shellcheck >/dev/null 2>&1 && echo ', shellcheck')) are as expected"

# ---------------------------------------------------------------------------------------
say "install into a throwaway root (dpkg --root, maintainer scripts run chrootless)"
root="$work/root"
mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates" "$root/var/lib/dpkg/triggers"
touch "$root/var/lib/dpkg/status"
rootdpkg() {
    # --force-depends: the throwaway root has no libc6 package. The scripts see
    # DPKG_ROOT=$root and act on it; deb-systemd-helper honours DPKG_ROOT too.
    env -u GATEHOUSE_PURGE_DATA dpkg --root="$root" --log="$work/dpkg.log" \
        --force-script-chrootless --force-depends "$@" >>"$work/dpkg.out" 2>&1 || {
        cat "$work/dpkg.out" >&2
        fail "dpkg $* failed"
    }
}
key="$root/etc/gatehouse/master-key"
check_key() { # check_key WHEN
    [ -f "$key" ] || fail "$1: /etc/gatehouse/master-key does not exist"
    local got
    got=$(stat -c '%a %U:%G %s' "$key")
    [ "$got" = "600 root:root 65" ] || fail "$1: the master key is '$got', expected '600 root:root 65' (mode, owner, size)"
    grep -Eqx '[0-9a-f]{64}' "$key" || fail "$1: the master key is not 64 lowercase hex digits and a newline"
}

(umask 000 && rootdpkg --install "$deb")
check_files "$root" "dpkg --install"
[ "$(stat -c '%a %U:%G' "$root/etc/gatehouse")" = "755 root:root" ] ||
    fail "/etc/gatehouse is $(stat -c '%a %U:%G' "$root/etc/gatehouse"), expected 755 root:root"
check_key "install (umask 000)"
key_sum=$(sha256sum <"$key")
if command -v deb-systemd-helper >/dev/null 2>&1; then
    wants="$root/etc/systemd/system/multi-user.target.wants/gatehouse.service"
    [ "$(readlink "$wants" || true)" = /usr/lib/systemd/system/gatehouse.service ] ||
        fail "install did not enable the unit ($wants is not a link to /usr/lib/systemd/system/gatehouse.service)"
    info "enabled: multi-user.target.wants/gatehouse.service (not started: the scripts start nothing)"
fi
info "installed; /etc/gatehouse/master-key created: 64 hex digits, root, 0600"

postinst_again() { # the installed postinst, run by hand as dpkg would run it
    DPKG_ROOT="$root" DPKG_MAINTSCRIPT_PACKAGE=gatehouse DPKG_MAINTSCRIPT_NAME=postinst \
        sh "$root/var/lib/dpkg/info/gatehouse.postinst" configure "$version" >>"$work/dpkg.out" 2>&1 ||
        fail "postinst configure, run again by hand, failed"
}
postinst_again
[ "$(sha256sum <"$key")" = "$key_sum" ] || fail "a second postinst run changed the master key"
rootdpkg --install "$deb"
[ "$(sha256sum <"$key")" = "$key_sum" ] || fail "an upgrade (reinstall) changed the master key"
check_key "upgrade"
rm "$key"
(umask 022 && postinst_again)
check_key "postinst with the key deleted (umask 022)"
[ "$(sha256sum <"$key")" != "$key_sum" ] || fail "postinst recreated the same master key"
key_sum=$(sha256sum <"$key")
info "a second postinst run and an upgrade kept the master key; a deleted key is created anew"

# ---------------------------------------------------------------------------------------
say "serve with the installed binary as nobody, pair a device, stop on SIGTERM"
nobody_gid=$(id -g nobody)
# What systemd gives the service (DynamicUser=yes, StateDirectory=, RuntimeDirectory=,
# LoadCredential=): /var/lib/gatehouse -> private/gatehouse, 0700; /run/gatehouse,
# 0700; the credential copied into a private directory. Here /var/lib/private is
# traversable, where systemd would hide it behind a mount namespace.
mkdir -p "$root/var/lib/private/gatehouse" "$root/run/gatehouse" "$root/run/credentials/gatehouse.service"
ln -s private/gatehouse "$root/var/lib/gatehouse"
# LogsDirectory= (/var/log/gatehouse): not used by this run, made for the purge checks.
mkdir -p "$root/var/log/private/gatehouse"
ln -s private/gatehouse "$root/var/log/gatehouse"
echo '{}' >"$root/var/log/private/gatehouse/audit-export.jsonl"
cp "$key" "$root/run/credentials/gatehouse.service/master-key"
chown -R nobody:"$nobody_gid" "$root/var/lib/private/gatehouse" "$root/run/gatehouse" "$root/run/credentials/gatehouse.service"
chmod 0700 "$root/var/lib/private/gatehouse" "$root/run/gatehouse"
chmod 0400 "$root/run/credentials/gatehouse.service/master-key"
chmod 0500 "$root/run/credentials/gatehouse.service"

# The installed binary, as nobody, in a clean environment, with the installed
# configuration file. GATEHOUSE_DATA and GATEHOUSE_ADMIN_SOCKET point the file's paths
# into the throwaway root; the master key comes from the credential directory, which
# ranks above the file's master_key_file (a host path this test does not create).
# setpriv and env exec, so the server's pid is the one started here.
as_service=(
    setpriv --reuid=nobody --regid="$nobody_gid" --clear-groups --no-new-privs --
    env -i PATH=/usr/bin:/bin LANG=C.UTF-8
    STATE_DIRECTORY="$root/var/lib/gatehouse"
    GATEHOUSE_DATA="$root/var/lib/gatehouse/gatehouse.redb"
    RUNTIME_DIRECTORY="$root/run/gatehouse"
    CREDENTIALS_DIRECTORY="$root/run/credentials/gatehouse.service"
    GATEHOUSE_CONFIG="$root/etc/gatehouse/gatehouse.toml"
    GATEHOUSE_ADMIN_SOCKET="$root/run/gatehouse/admin.sock"
    GATEHOUSE_LISTEN=127.0.0.1:0
    GATEHOUSE_LOG_FORMAT=json
    "$root/usr/bin/gatehouse"
)

# Port 0: the kernel picks a free high port, read back from the "listening on" line,
# so no other process can take it between choosing and binding.
"${as_service[@]}" serve >"$work/serve.out" 2>"$work/serve.err" &
server_pid=$!
port=
for _ in $(seq 1 300); do
    port=$(sed -n 's|^gatehouse listening on https://127\.0\.0\.1:\([0-9]*\)$|\1|p' "$work/serve.out")
    [ -n "$port" ] && break
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
done
if [ -z "$port" ]; then
    cat "$work/serve.out" "$work/serve.err" >&2
    fail "the installed binary did not start serving within 30 s"
fi
info "serving on https://127.0.0.1:$port as $(ps -o user= -p "$server_pid" 2>/dev/null || echo nobody), pid $server_pid"
grep -q '^admin socket: '"$root"'/run/gatehouse/admin.sock$' "$work/serve.out" ||
    fail "the admin socket is not in the runtime directory: $(grep '^admin socket' "$work/serve.out")"
bootstrap=$(sed -n 's/^ *\(gha_[A-Za-z0-9_-]*\)$/\1/p' "$work/serve.out" | head -n 1)
[ -n "$bootstrap" ] || fail "no bootstrap admin token on the first start's standard output"
pin=$(sed -n 's|.*SPKI pin \(sha256/[A-Za-z0-9+/=]*\).*|\1|p' "$work/serve.out")
[ -n "$pin" ] || fail "no SPKI pin on the first start's standard output"

# Trust the certificate the server presents, once it matches the pin printed at start
# (what an operator does out of band), then verify every request against it.
openssl s_client -connect "127.0.0.1:$port" -servername localhost </dev/null 2>/dev/null |
    openssl x509 -out "$work/server.pem" || fail "could not fetch the server certificate"
fetched_pin="sha256/$(openssl x509 -in "$work/server.pem" -pubkey -noout |
    openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | openssl base64 -A)"
[ "$fetched_pin" = "$pin" ] || fail "the fetched certificate's pin $fetched_pin is not the printed $pin"
info "certificate fetched; its SPKI pin matches the printed one ($pin)"

api() { # api METHOD PATH [curl args...]: prints the status; the body goes to $work/body
    local method=$1 path=$2
    shift 2
    curl -sS --max-time 10 --cacert "$work/server.pem" --resolve "localhost:$port:127.0.0.1" \
        -X "$method" -o "$work/body" -w '%{http_code}' "$@" "https://localhost:$port$path" ||
        fail "curl $method $path failed (TLS verification against the fetched certificate, or the connection)"
}
json_field() { sed -n 's/.*"'"$1"'"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' "$work/body"; }

status=$(api GET /healthz)
[ "$status" = 200 ] || fail "GET /healthz answered $status: $(cat "$work/body")"
status=$(api POST /v1/pairing/sessions -H "Authorization: Bearer $bootstrap" \
    -H 'content-type: application/json' -d '{"name":"package test"}')
[ "$status" = 201 ] || fail "POST /v1/pairing/sessions answered $status, expected 201: $(cat "$work/body")"
session=$(json_field session_id)
secret=$(json_field secret)
if [ -z "$session" ] || [ -z "$secret" ]; then
    fail "no session_id or secret in the pairing session: $(cat "$work/body")"
fi
status=$(api POST /v1/pair -H 'content-type: application/json' \
    -d '{"session_id":"'"$session"'","secret":"'"$secret"'","device":{"name":"package-test","platform":"linux","app_version":"1.0"}}')
[ "$status" = 200 ] || fail "POST /v1/pair answered $status, expected 200: $(cat "$work/body")"
access=$(json_field access_token)
device=$(json_field device_id)
grep -Eqx '[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+' <<<"$access" ||
    fail "POST /v1/pair returned no access token (a JWT): $(cat "$work/body")"
[ -n "$(json_field refresh_token)" ] || fail "POST /v1/pair returned no refresh token"
info "paired device $device: 200 with an access token (JWT) and a refresh token"

"${as_service[@]}" devices list >"$work/devices.out" 2>"$work/devices.err" ||
    fail "gatehouse devices list through the admin socket failed: $(cat "$work/devices.err")"
grep -q "$device" "$work/devices.out" || fail "gatehouse devices list does not show $device: $(cat "$work/devices.out")"
info "gatehouse devices list, as the same user through the admin socket, shows the device"

kill -TERM "$server_pid"
server_rc=0
wait "$server_pid" || server_rc=$?
server_pid=
[ "$server_rc" = 0 ] || {
    tail -n 20 "$work/serve.err" >&2
    fail "the server exited with code $server_rc after SIGTERM, expected 0"
}
grep -q '"message":"stopped"' "$work/serve.err" || fail "no 'stopped' log line after SIGTERM"
[ ! -e "$root/run/gatehouse/admin.sock" ] || fail "the admin socket was left behind after the stop"
if grep -q '"level":"ERROR"' "$work/serve.err"; then
    grep '"level":"ERROR"' "$work/serve.err" >&2
    fail "the server logged errors"
fi
grep '"level":"WARN"' "$work/serve.err" | sed 's/^/   log: /' || true
data="$root/var/lib/private/gatehouse/gatehouse.redb"
[ "$(stat -c '%a %U' "$data")" = "600 nobody" ] ||
    fail "the data file is $(stat -c '%a %U' "$data"), expected 600 nobody"
[ ! -e "$root/var/lib/private/gatehouse/gatehouse.redb.key" ] ||
    fail "a key file was created beside the data file: the credential was not used"
info "SIGTERM: exit code 0, admin socket removed; data file 0600 nobody, no key beside it"

# ---------------------------------------------------------------------------------------
say "remove and purge"
rootdpkg --remove gatehouse
[ ! -e "$root/usr/bin/gatehouse" ] || fail "remove left /usr/bin/gatehouse"
[ -f "$root/etc/gatehouse/gatehouse.toml" ] || fail "remove deleted the configuration file"
[ "$(sha256sum <"$key")" = "$key_sum" ] || fail "remove changed or deleted the master key"
[ -f "$data" ] || fail "remove deleted the data"
info "remove: binary gone; configuration, master key and data kept"

rootdpkg --purge gatehouse
[ ! -e "$root/etc/gatehouse/gatehouse.toml" ] || fail "purge kept the configuration file"
[ "$(sha256sum <"$key")" = "$key_sum" ] || fail "purge without GATEHOUSE_PURGE_DATA=yes changed or deleted the master key"
if [ ! -f "$data" ] || [ ! -L "$root/var/lib/gatehouse" ] ||
    [ ! -f "$root/var/log/private/gatehouse/audit-export.jsonl" ] || [ ! -L "$root/var/log/gatehouse" ]; then
    fail "purge without GATEHOUSE_PURGE_DATA=yes deleted data or logs"
fi
grep -q 'kept /etc/gatehouse/master-key' "$work/dpkg.out" || fail "purge did not say where the master key remains"
[ ! -e "$root/etc/systemd/system/multi-user.target.wants/gatehouse.service" ] ||
    fail "purge left the unit enabled"
info "purge: configuration and enablement gone; data, logs and master key kept, and the purge said where"

rootdpkg --install "$deb"
[ "$(sha256sum <"$key")" = "$key_sum" ] || fail "reinstalling after a purge replaced the kept master key"
GATEHOUSE_PURGE_DATA=yes dpkg --root="$root" --log="$work/dpkg.log" --force-script-chrootless \
    --purge gatehouse >>"$work/dpkg.out" 2>&1 || fail "dpkg --purge with GATEHOUSE_PURGE_DATA=yes failed"
for gone in /etc/gatehouse /var/lib/gatehouse /var/lib/private/gatehouse /var/log/gatehouse \
    /var/log/private/gatehouse /usr/bin/gatehouse; do
    if [ -e "$root$gone" ] || [ -L "$root$gone" ]; then
        fail "purge with GATEHOUSE_PURGE_DATA=yes left $gone"
    fi
done
info "reinstall kept the key; purge with GATEHOUSE_PURGE_DATA=yes deleted the data, logs and key"

echo "package test passed: $deb, lintian clean, exposure $exposure, install/serve/pair/stop/remove/purge ok ($(($(date +%s) - started)) s)"
