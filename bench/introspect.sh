#!/usr/bin/env bash
# Introspection throughput, gatehouse against the node oidc-provider peer, sequentially on
# this machine with the same wrk command (2 threads, 64 connections, HTTPS, keep-alive).
#
#   bench/introspect.sh [seconds]        # default 10 seconds per server
#
# gatehouse side: builds the release binary, starts `gatehouse serve` on a temporary data
# file (loopback, a free port, self-signed TLS, default settings), registers an API client
# through the admin socket, pairs a device over HTTPS (bootstrap admin token -> pairing
# session -> /v1/pair) and runs wrk against POST /v1/introspect with the client's HTTP
# Basic credentials and the device's access token. Peer side (when PEER_DIR names the
# oidc-provider peer: a directory with its run.sh, server.js, package.json and
# introspect.lua): a writable copy (kept under ~/.cache so npm installs once), run with
# its own run.sh. Without PEER_DIR only gatehouse is measured. Prints both Requests/sec and the ratio. Needs: cargo, wrk, curl, python3,
# node/npm, openssl. GATEHOUSE_BIN=path uses that binary instead of building one.
set -euo pipefail

seconds=${1:-10}
root=$(cd "$(dirname "$0")/.." && pwd)
peer_src=${PEER_DIR:-}
peer_dir=${XDG_CACHE_HOME:-$HOME/.cache}/gatehouse-bench/oidc-provider

say() { printf '%s\n' "$*" >&2; }
die() { say "introspect.sh: $*"; exit 1; }

for tool in cargo curl python3 node npm openssl; do
  command -v "$tool" >/dev/null || die "$tool is missing"
done
if ! command -v wrk >/dev/null; then
  say "installing wrk (apt-get install -y wrk)"
  apt-get install -y wrk >/dev/null || die "cannot install wrk"
fi

if [ -n "${GATEHOUSE_BIN:-}" ]; then
  bin=$GATEHOUSE_BIN # e.g. a build with symbols, for profiling (bench/README.md)
else
  say "building the release binary"
  (cd "$root" && cargo build --release --locked --quiet) || die "build failed"
  bin=$root/target/release/gatehouse
fi

tmp=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Reads one JSON field from stdin.
field() { python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

requests_per_sec() { awk '/^Requests\/sec:/ { print $2 }'; }
# User + system CPU time of a process so far, in clock ticks (/proc/PID/stat fields 14, 15).
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# Waits (at most 90 s) for the 1-minute load average to fall below 1, so that the build
# or the previous run does not weigh on the next one; then reports the load.
settle() {
  for _ in $(seq 1 18); do
    awk '{ exit !($1 < 1.0) }' /proc/loadavg && break
    sleep 5
  done
  say "load before the $1 run: $(uptime)"
}

# ---------------------------------------------------------------------------------------
# gatehouse

port=$(free_port)
data=$tmp/gatehouse.redb
url=https://127.0.0.1:$port
# wrk sends everything from one address and one client: the per-address and
# per-client limits (6000 a minute each by default) would measure the limiter instead.
GATEHOUSE_RATELIMIT_PER_IP=off GATEHOUSE_RATELIMIT_INTROSPECTION=off \
  env -u GATEHOUSE_BIN "$bin" serve --data "$data" --listen "127.0.0.1:$port" >"$tmp/serve.out" 2>"$tmp/serve.err" &
server_pid=$!
for _ in $(seq 1 100); do
  grep -q '^gatehouse listening on' "$tmp/serve.out" 2>/dev/null && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$tmp/serve.err" >&2; die "gatehouse serve exited"; }
  sleep 0.1
done
grep -q '^gatehouse listening on' "$tmp/serve.out" || die "gatehouse did not start in 10 s"
admin=$(awk '$1 ~ /^gha_/ { print $1; exit }' "$tmp/serve.out")
[ -n "$admin" ] || die "no bootstrap admin token on stdout"

# Through the admin socket, since the server holds the data file.
env -u GATEHOUSE_BIN "$bin" clients create --name bench --data "$data" >"$tmp/client.out" 2>/dev/null ||
  die "clients create failed"
client_id=$(sed -n 's/^client_id=//p' "$tmp/client.out")
client_secret=$(sed -n 's/^client_secret=//p' "$tmp/client.out")
[ -n "$client_id" ] && [ -n "$client_secret" ] || die "clients create printed no credentials"

session=$(curl -skf -X POST "$url/v1/pairing/sessions" \
  -H "Authorization: Bearer $admin" -H 'Content-Type: application/json' \
  -d '{"name":"bench"}') || die "cannot open a pairing session"
session_id=$(field session_id <<<"$session")
secret=$(field secret <<<"$session")
pair_body=$(python3 -c 'import json, sys; print(json.dumps({"session_id": sys.argv[1], "secret": sys.argv[2],
  "device": {"name": "bench phone", "platform": "android", "app_version": "1.0"}}))' "$session_id" "$secret")
pair=$(curl -skf -X POST "$url/v1/pair" -H 'Content-Type: application/json' -d "$pair_body") ||
  die "pairing failed"
access_token=$(field access_token <<<"$pair")

AUTH="Basic $(printf '%s:%s' "$client_id" "$client_secret" | base64 -w0)"
TOKEN=$access_token
export AUTH TOKEN
introspect() {
  curl -skf -X POST "$url/v1/introspect" -H "Authorization: $AUTH" \
    -H 'Content-Type: application/x-www-form-urlencoded' -d "token=$TOKEN"
}
[ "$(introspect | field active)" = True ] || die "the access token does not introspect as active"

settle gatehouse
say "gatehouse: wrk -t2 -c64 -d${seconds}s against $url/v1/introspect"
cpu_before=$(cpu_ticks "$server_pid")
wrk -t2 -c64 -d"${seconds}s" -s "$root/bench/introspect.lua" "$url/v1/introspect" \
  >"$tmp/wrk-gatehouse.txt" || die "wrk failed"
cpu_after=$(cpu_ticks "$server_pid")
cat "$tmp/wrk-gatehouse.txt"
# The server's CPU time per request (user + system, from /proc): unlike the rate, it
# does not depend on how the two cores were shared with wrk.
requests=$(awk '/requests in/ { print $1; exit }' "$tmp/wrk-gatehouse.txt")
awk -v t="$((cpu_after - cpu_before))" -v hz="$(getconf CLK_TCK)" -v n="$requests" \
  'BEGIN { if (n > 0) printf "gatehouse server CPU per request: %.1f us\n", t * 1e6 / hz / n }' >&2
if grep -q 'Non-2xx' "$tmp/wrk-gatehouse.txt"; then
  die "gatehouse answered some requests with an error status (see above)"
fi
[ "$(introspect | field active)" = True ] || die "the access token stopped introspecting as active"
ours=$(requests_per_sec <"$tmp/wrk-gatehouse.txt")

kill "$server_pid"
wait "$server_pid" 2>/dev/null || true
server_pid=

# ---------------------------------------------------------------------------------------
# The peer: its own script, from a writable copy (node_modules kept between runs)

if [ -z "$peer_src" ]; then
  echo
  echo "gatehouse      /v1/introspect          Requests/sec: $ours"
  say "PEER_DIR is not set: the peer was not measured"
  exit 0
fi
[ -f "$peer_src/run.sh" ] || die "PEER_DIR=$peer_src has no run.sh"

mkdir -p "$peer_dir"
cp -f "$peer_src"/README.md "$peer_src"/introspect.lua "$peer_src"/package.json \
  "$peer_src"/run.sh "$peer_src"/server.js "$peer_dir"/
chmod -R u+w "$peer_dir"
if [ ! -d "$peer_dir/node_modules" ]; then
  say "installing the peer (npm install, once)"
  (cd "$peer_dir" && npm install --no-audit --no-fund >/dev/null 2>&1) || die "npm install failed"
fi
settle peer
peer_port=$(free_port)
say "oidc-provider: $peer_dir/run.sh $seconds (PORT=$peer_port)"
PORT=$peer_port bash "$peer_dir/run.sh" "$seconds" >"$tmp/wrk-peer.txt" 2>&1 || true
cat "$tmp/wrk-peer.txt"
theirs=$(requests_per_sec <"$tmp/wrk-peer.txt")
[ -n "$theirs" ] || die "the peer run printed no Requests/sec"
if grep -q 'Non-2xx' "$tmp/wrk-peer.txt"; then
  say "warning: the peer answered some requests with an error status; its figure is not comparable"
fi

echo
echo "gatehouse      /v1/introspect          Requests/sec: $ours"
echo "oidc-provider  /token/introspection    Requests/sec: $theirs"
python3 - "$ours" "$theirs" <<'PY'
import sys
ours, theirs = map(float, sys.argv[1:])
ratio = ours / theirs
verdict = "met" if ratio >= 4 else "NOT met"
print(f"ratio gatehouse / oidc-provider: {ratio:.2f}x (target >= 4x: {verdict})")
PY
say "load after the run: $(uptime)"
