#!/usr/bin/env bash
# The front door under load: gatehouse in front of an app, against Caddy asking gatehouse
# (forward_auth) and against Caddy alone, with the same upstream and the same wrk command
# (2 threads, 64 connections, keep-alive), one case after another on this machine.
#
#   bench/front.sh [seconds]        # default 10 seconds per case
#
# The upstream is nginx on loopback answering every request with a fixed `200 ok`
# (HTTP/1.1, keep-alive, a configuration written to a temporary prefix: it runs as any
# user). The four cases, in this order:
#
#   (d) the upstream direct, plain HTTP;
#   (a) `gatehouse serve --upstream http://<nginx>`, HTTPS (self-signed), a paired
#       device's access token as `Authorization: Bearer`;
#   (b) Caddy, HTTPS (its internal CA), with the `forward_auth` configuration of
#       docs/forward-auth.md (read from that page, addresses replaced) in front of
#       gatehouse as that page configures it (plain HTTP on loopback), the same token;
#   (c) Caddy, HTTPS, plain `reverse_proxy` to the upstream, no authentication.
#
# Every case sends the same request (bench/front.lua: GET / with the token). gatehouse
# runs on one temporary data file: it is started for (a), where the device is paired,
# and started again on the same file for (b) with the document's settings and the same
# issuer (and token lifetime), so (b) checks the very token (a) does. (d) and (a) also
# run with one connection (`wrk -t1 -c1`): with 64 connections every request queues
# behind the others, so the latency there is mostly 64 / throughput.
#
# Prints Requests/sec, p50 and p99 latency of each case, the ratios a/b and a/c, the p99
# latency (a) adds over (d), and the CPU time each server process spent per request
# (user + system from /proc, which does not depend on how the two cores were shared with
# wrk). Fails if a case answers anything but 2xx.
#
# Needs: cargo, curl, python3, wrk, caddy, nginx. GATEHOUSE_BIN=path uses that binary
# instead of building one; CADDY=path and NGINX=path other caddy and nginx binaries.
set -euo pipefail

seconds=${1:-10}
root=$(cd "$(dirname "$0")/.." && pwd)
caddy=${CADDY:-caddy}
nginx=${NGINX:-nginx}
wrk_args=(-t2 -c64 -d"${seconds}s" --latency)

say() { printf '%s\n' "$*" >&2; }
die() { say "front.sh: $*"; exit 1; }

# nginx is often outside a normal user's PATH (/usr/sbin).
if [ -z "${NGINX:-}" ] && ! command -v nginx >/dev/null && [ -x /usr/sbin/nginx ]; then
  nginx=/usr/sbin/nginx
fi
command -v wrk >/dev/null || die "wrk is missing (Debian: apt-get install wrk); it is the load generator"
command -v "$caddy" >/dev/null || die "caddy is missing (Debian: apt-get install caddy; or CADDY=path); cases (b) and (c) need it"
command -v "$nginx" >/dev/null || die "nginx is missing (Debian: apt-get install nginx-light; or NGINX=path); it is the upstream"
for tool in cargo curl python3; do
  command -v "$tool" >/dev/null || die "$tool is missing"
done
[ "$seconds" -ge 1 ] 2>/dev/null || die "the first argument is the seconds per case (a whole number, at least 1)"

if [ -n "${GATEHOUSE_BIN:-}" ]; then
  bin=$GATEHOUSE_BIN
else
  say "building the release binary"
  (cd "$root" && cargo build --release --locked --quiet) || die "build failed"
  bin=${CARGO_TARGET_DIR:-$root/target}/release/gatehouse
fi
[ -x "$bin" ] || die "no gatehouse binary at $bin"

tmp=$(mktemp -d)
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$tmp"
}
trap cleanup EXIT

# Stops one process this script started.
stop() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Reads one JSON field from stdin.
field() { python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

# User + system CPU time of each process so far, in clock ticks (/proc/PID/stat fields
# 14, 15), one line each.
cpu_ticks() {
  local pid
  for pid in "$@"; do
    awk '{ print $14 + $15 }' "/proc/$pid/stat"
  done
}

# CPU time the whole machine spent busy so far, in clock ticks (/proc/stat: user, nice,
# system, irq, softirq, steal).
busy_ticks() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }

# Waits (at most 90 s) for the 1-minute load average to fall below 1, so that the build
# or the previous case does not weigh on the next one; then reports the load.
settle() {
  for _ in $(seq 1 18); do
    awk '{ exit !($1 < 1.0) }' /proc/loadavg && break
    sleep 5
  done
  say "load before $1: $(cut -d' ' -f1-3 /proc/loadavg)"
}

# The end of every log this script's processes wrote, for a failure.
show_logs() {
  local log
  for log in "$tmp"/*.err "$tmp"/*/out "$tmp"/nginx/error.log; do
    [ -s "$log" ] && { say "--- ${log#"$tmp"/}"; tail -n 5 "$log" >&2; }
  done
  return 0
}

# Waits (at most 10 s) until `curl -sk URL` with the token answers `ok`.
wait_ok() {
  local url=$1 pid=$2 what=$3 answer=
  for _ in $(seq 1 100); do
    answer=$(curl -sk -w ' (%{http_code})' -H "Authorization: Bearer $TOKEN" "$url" 2>&1) || true
    [ "$answer" = 'ok (200)' ] && return 0
    kill -0 "$pid" 2>/dev/null || { show_logs; die "$what exited"; }
    sleep 0.1
  done
  show_logs
  die "$what did not answer ok at $url within 10 s; its last answer: $answer"
}

# run CASE URL PID... : wrk against URL (wrk_args, or the arguments in $wrk_override
# when set); the CPU time of each PID is counted.
run() {
  local name=$1 url=$2 args=("${wrk_args[@]}")
  shift 2
  if [ -n "${wrk_override:-}" ]; then
    read -ra args <<<"$wrk_override"
  fi
  settle "($name)"
  say "($name): wrk ${args[*]} -s bench/front.lua $url"
  local busy_before ours_before started TIMEFORMAT='%3U %3S' ours=("$@")
  [[ " $* " == *" $nginx_worker "* ]] || ours+=("$nginx_worker")
  cpu_ticks "$@" >"$tmp/cpu-before-$name.txt"
  ours_before=$(cpu_ticks "${ours[@]}" | awk '{ t += $1 } END { print t }')
  busy_before=$(busy_ticks)
  started=$(date +%s.%N)
  { time wrk "${args[@]}" -s "$root/bench/front.lua" "$url" >"$tmp/wrk-$name.txt"; } \
    2>"$tmp/time-$name.txt" || die "wrk failed"
  cpu_ticks "$@" | paste -d' ' "$tmp/cpu-before-$name.txt" - | awk '{ print $2 - $1 }' \
    >"$tmp/cpu-$name.txt"
  # The cores other processes (not the servers, nginx or wrk) used meanwhile: a run
  # that shared the machine with a build is slower for reasons of its own.
  awk -v busy="$(($(busy_ticks) - busy_before))" \
    -v ours="$(($(cpu_ticks "${ours[@]}" | awk '{ t += $1 } END { print t }') - ours_before))" \
    -v hz="$(getconf CLK_TCK)" -v started="$started" -v ended="$(date +%s.%N)" \
    '{ wrk = $1 + $2 } END { printf "%.2f\n", ((busy - ours) / hz - wrk) / (ended - started) }' \
    "$tmp/time-$name.txt" >"$tmp/others-$name.txt"
  cat "$tmp/wrk-$name.txt" >&2
  if grep -q 'Non-2xx' "$tmp/wrk-$name.txt"; then
    die "($name) answered some requests with an error status (see above)"
  fi
}

# ---------------------------------------------------------------------------------------
# The upstream: nginx, unprivileged, everything it writes under a temporary prefix.

up_port=$(free_port)
mkdir -p "$tmp/nginx"
cat >"$tmp/nginx/nginx.conf" <<EOF
daemon off;
worker_processes 1;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $tmp/nginx/client_body;
    proxy_temp_path $tmp/nginx/proxy;
    fastcgi_temp_path $tmp/nginx/fastcgi;
    uwsgi_temp_path $tmp/nginx/uwsgi;
    scgi_temp_path $tmp/nginx/scgi;
    # Connections to the upstream stay open for the whole run, for every client.
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {
        listen 127.0.0.1:$up_port;
        location / {
            default_type text/plain;
            return 200 "ok";
        }
    }
}
EOF
"$nginx" -p "$tmp/nginx" -e "$tmp/nginx/error.log" -c "$tmp/nginx/nginx.conf" \
  >"$tmp/nginx/out" 2>&1 &
nginx_pid=$!
pids+=("$nginx_pid")
TOKEN=none
export TOKEN
wait_ok "http://127.0.0.1:$up_port/" "$nginx_pid" nginx
nginx_worker=$(pgrep -P "$nginx_pid" | head -n1)
[ -n "$nginx_worker" ] || die "no nginx worker process"
upstream=127.0.0.1:$up_port

# ---------------------------------------------------------------------------------------
# gatehouse as the front door: HTTPS, self-signed, its default settings but for the two
# below. wrk is one client at one address: the per-address limit (6000 a minute by
# default) would measure the limiter. The token must outlive every case.

data=$tmp/gatehouse.redb
issuer=https://auth.example.com # the issuer of docs/forward-auth.md's settings
a_port=$(free_port)
a_url=https://127.0.0.1:$a_port
GATEHOUSE_RATELIMIT_PER_IP=off GATEHOUSE_ACCESS_TTL=1h GATEHOUSE_ISSUER=$issuer \
  env -u GATEHOUSE_BIN "$bin" serve --data "$data" --listen "127.0.0.1:$a_port" \
  --upstream "http://$upstream" >"$tmp/serve-a.out" 2>"$tmp/serve-a.err" &
a_pid=$!
pids+=("$a_pid")
for _ in $(seq 1 100); do
  grep -q '^gatehouse listening on' "$tmp/serve-a.out" 2>/dev/null && break
  kill -0 "$a_pid" 2>/dev/null || { cat "$tmp/serve-a.err" >&2; die "gatehouse serve exited"; }
  sleep 0.1
done
grep -q '^gatehouse listening on' "$tmp/serve-a.out" || die "gatehouse did not start in 10 s"
admin=$(awk '$1 ~ /^gha_/ { print $1; exit }' "$tmp/serve-a.out")
[ -n "$admin" ] || die "no bootstrap admin token on stdout"

session=$(curl -skf -X POST "$a_url/v1/pairing/sessions" \
  -H "Authorization: Bearer $admin" -H 'Content-Type: application/json' \
  -d '{"name":"bench"}') || die "cannot open a pairing session"
session_id=$(field session_id <<<"$session")
secret=$(field secret <<<"$session")
pair_body=$(python3 -c 'import json, sys; print(json.dumps({"session_id": sys.argv[1], "secret": sys.argv[2],
  "device": {"name": "bench phone", "platform": "android", "app_version": "1.0"}}))' "$session_id" "$secret")
pair=$(curl -skf -X POST "$a_url/v1/pair" -H 'Content-Type: application/json' -d "$pair_body") ||
  die "pairing failed"
TOKEN=$(field access_token <<<"$pair")
export TOKEN
wait_ok "$a_url/" "$a_pid" "gatehouse (a)"
status=$(curl -sk -o /dev/null -w '%{http_code}' "$a_url/") || true
[ "$status" = 401 ] || die "gatehouse (a) answered $status, not 401, without a token"

run d "http://$upstream/" "$nginx_worker"
run a "$a_url/" "$a_pid"
# The same two without load: one connection, one request at a time, so that the latency
# gatehouse adds is not hidden by queueing behind 63 other connections.
wrk_override="-t1 -c1 -d${seconds}s --latency" run d1 "http://$upstream/" "$nginx_worker"
wrk_override="-t1 -c1 -d${seconds}s --latency" run a1 "$a_url/" "$a_pid"
stop "$a_pid"

# ---------------------------------------------------------------------------------------
# (b): gatehouse with the settings of docs/forward-auth.md (plain HTTP on loopback, the
# proxy trusted, the same issuer), on the same data file, behind Caddy's forward_auth.

# The one ```LANG block of docs/forward-auth.md.
doc_block() {
  awk -v open="\`\`\`$1" '$0 == open { inside = 1; next } inside && /^```/ { exit } inside' \
    "$root/docs/forward-auth.md"
}
# Replaces every FROM in stdin with TO; FROM must be there.
substitute() {
  python3 -c 'import sys
text = sys.stdin.read()
if sys.argv[1] not in text:
    sys.exit(f"the configuration does not name {sys.argv[1]}")
sys.stdout.write(text.replace(sys.argv[1], sys.argv[2]))' "$1" "$2"
}

g_port=$(free_port)
doc_block toml | substitute 127.0.0.1:8080 "127.0.0.1:$g_port" >"$tmp/gatehouse.toml"
grep -q "issuer = \"$issuer\"" "$tmp/gatehouse.toml" || die "the document's issuer is no longer $issuer"
# The same access-token lifetime as (a): a token living longer than it is refused.
GATEHOUSE_RATELIMIT_PER_IP=off GATEHOUSE_ACCESS_TTL=1h env -u GATEHOUSE_BIN -u GATEHOUSE_ISSUER \
  "$bin" --config "$tmp/gatehouse.toml" serve --data "$data" \
  >"$tmp/serve-b.out" 2>"$tmp/serve-b.err" &
g_pid=$!
pids+=("$g_pid")

# Caddy's global options for both Caddy cases: no admin endpoint, certificates from its
# own CA (never installed into the system's trust store), its state in the temporary
# directory, no HTTP->HTTPS redirect listener.
caddy_globals='{
	admin off
	local_certs
	skip_install_trust
	auto_https disable_redirects
}
'
# start_caddy NAME : runs caddy on $tmp/NAME/Caddyfile; prints its pid.
start_caddy() {
  local dir=$tmp/$1
  HOME=$dir XDG_DATA_HOME=$dir XDG_CONFIG_HOME=$dir \
    "$caddy" run --adapter caddyfile --config "$dir/Caddyfile" >"$dir/out" 2>&1 &
  echo $!
}

b_port=$(free_port)
auth_port=$(free_port)
mkdir -p "$tmp/caddy-b"
{
  printf '%s\n' "$caddy_globals"
  doc_block caddyfile |
    substitute app.example.com "https://127.0.0.1:$b_port" |
    substitute auth.example.com "http://127.0.0.1:$auth_port" |
    substitute 127.0.0.1:8080 "127.0.0.1:$g_port" |
    substitute 127.0.0.1:3000 "$upstream"
} >"$tmp/caddy-b/Caddyfile"
b_caddy=$(start_caddy caddy-b)
pids+=("$b_caddy")
for _ in $(seq 1 100); do
  grep -q '^gatehouse listening on' "$tmp/serve-b.out" 2>/dev/null && break
  kill -0 "$g_pid" 2>/dev/null || { cat "$tmp/serve-b.err" >&2; die "gatehouse serve (b) exited"; }
  sleep 0.1
done
wait_ok "https://127.0.0.1:$b_port/" "$b_caddy" "caddy (b)"
status=$(curl -sk -o /dev/null -w '%{http_code}' "https://127.0.0.1:$b_port/") || true
[ "$status" = 401 ] || die "caddy (b) answered $status, not 401, without a token"

run b "https://127.0.0.1:$b_port/" "$b_caddy" "$g_pid"
stop "$b_caddy"
stop "$g_pid"

# ---------------------------------------------------------------------------------------
# (c): Caddy alone, reverse_proxy to the same upstream.

c_port=$(free_port)
mkdir -p "$tmp/caddy-c"
{
  printf '%s\n' "$caddy_globals"
  printf 'https://127.0.0.1:%s {\n\treverse_proxy %s\n}\n' "$c_port" "$upstream"
} >"$tmp/caddy-c/Caddyfile"
c_caddy=$(start_caddy caddy-c)
pids+=("$c_caddy")
wait_ok "https://127.0.0.1:$c_port/" "$c_caddy" "caddy (c)"

run c "https://127.0.0.1:$c_port/" "$c_caddy"
stop "$c_caddy"
say "load after the run: $(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------------------------------

echo
python3 - "$tmp" "$(getconf CLK_TCK)" <<'PY'
import re, sys

tmp, hz = sys.argv[1], int(sys.argv[2])
unit = {"us": 1e-3, "ms": 1.0, "s": 1e3}

def read(case):
    text = open(f"{tmp}/wrk-{case}.txt").read()
    rate = float(re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M).group(1))
    count = int(re.search(r"^\s*(\d+) requests in", text, re.M).group(1))
    lat = {}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        lat[pct] = float(m.group(1)) * unit[m.group(2)]
    errors = re.search(r"Socket errors:.*", text)
    ticks = [int(line) for line in open(f"{tmp}/cpu-{case}.txt")]
    cpu = [t / hz / count * 1e6 for t in ticks]
    others = float(open(f"{tmp}/others-{case}.txt").read())
    return rate, lat["50"], lat["99"], cpu, errors.group(0) if errors else "", others

names = {
    "d": "(d) upstream direct (nginx, HTTP)",
    "a": "(a) gatehouse front door, HTTPS",
    "b": "(b) Caddy forward_auth + gatehouse",
    "c": "(c) Caddy reverse_proxy, HTTPS",
    "d1": "(d) one connection",
    "a1": "(a) one connection",
}
cpu_of = {
    "d": ["nginx"], "a": ["gatehouse"], "b": ["caddy", "gatehouse"], "c": ["caddy"],
    "d1": ["nginx"], "a1": ["gatehouse"],
}
r = {case: read(case) for case in names}
print(f"{'case':<36} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'others':>6}  CPU per request")
for case in names:
    rate, p50, p99, cpu, errors, others = r[case]
    parts = " + ".join(f"{who} {c:.1f} us" for who, c in zip(cpu_of[case], cpu))
    print(f"{names[case]:<36} {rate:>9.0f} {p50:>7.2f} {p99:>7.2f} {others:>6.2f}  {parts}")
    if errors:
        print(f"    {errors}")

print("others: cores used by other processes during the case (not the servers, nginx or wrk)")

def verdict(ok):
    return "met" if ok else "NOT met"

ab = r["a"][0] / r["b"][0]
ac = r["a"][0] / r["c"][0]
added = r["a"][2] - r["d"][2]
print(f"throughput a/b: {ab:.2f}x (goal >= 1.5x: {verdict(ab >= 1.5)})")
print(f"throughput a/c: {ac:.2f}x (goal >= 0.9x: {verdict(ac >= 0.9)})")
print(f"p99 added by (a) over (d), 64 connections: {added:.2f} ms (goal <= 1 ms: {verdict(added <= 1.0)})")
print(f"p99 added by (a) over (d), one connection: {r['a1'][2] - r['d1'][2]:.2f} ms "
      f"(p50 {r['a1'][1] - r['d1'][1]:.2f} ms)")
PY
