#!/usr/bin/env bash
# The request path under load: gatehouse's cheapest answer beside Caddy's, and
# introspection beside both, with the same wrk command in one run on this machine.
#
#   bench/request_path.sh [seconds]        # default 10 seconds per case
#
# Every case is `wrk -t2 -c64 -d<seconds>s --latency` over HTTPS with keep-alive:
#
#   (t) gatehouse (release build), `GET /healthz`: self-signed TLS, default settings but
#       `ratelimit.per_ip = off` and `ratelimit.introspection = off` (wrk is one address
#       and one client);
#   (p) Caddy (`tls internal`), a `respond` with the same status, body and response
#       headers as (t): the headers are read from gatehouse's /healthz at run time and
#       given to Caddy's `header` directive, Caddy's own `Server` header removed, and
#       x-request-id a fixed value as long as gatehouse's. date and content-length come
#       from each server. The script checks both answers match before measuring;
#   (i) gatehouse, `POST /v1/introspect` of a paired device's access token (verified once,
#       then answered from the cache of verified signatures) with an API client's HTTP
#       Basic credentials, as bench/introspect.sh does (bench/introspect.lua);
#   (o) only when PEER_DIR names the node oidc-provider peer (a directory holding its
#       server.js, package.json and introspect.lua): the peer's server on a copy under
#       ~/.cache (npm installs once) and the same wrk command against its
#       /token/introspection with its own introspect.lua.
#
# ROUNDS=N runs (t), (p) and (i) N times in turn (default 1) and reports the median of
# each; (o) runs once, after them. Before every case the script waits (at most 90 s) for
# the 1-minute load average to fall under 1. It prints per case Requests/sec, the p50
# and p99 latency, the server's CPU time per request (user + system from /proc, which
# does not depend on how the two cores were shared with wrk) and the cores other
# processes used meanwhile; then the ratios t/p (goal >= 1.4), i/t (goal >= 0.9) and
# i/o (keep >= 6). Fails if any answer under load is not 2xx.
#
# Needs: wrk, caddy, curl, openssl, cargo, python3 (and node/npm for (o)).
# GATEHOUSE_BIN=path uses that binary instead of building one; CADDY=path another caddy.
set -euo pipefail

seconds=${1:-10}
rounds=${ROUNDS:-1}
root=$(cd "$(dirname "$0")/.." && pwd)
caddy=${CADDY:-caddy}
peer_src=${PEER_DIR:-}
peer_dir=${XDG_CACHE_HOME:-$HOME/.cache}/gatehouse-bench/oidc-provider
wrk_args=(-t2 -c64 -d"${seconds}s" --latency)

say() { printf '%s\n' "$*" >&2; }
die() { say "request_path.sh: $*"; exit 1; }

command -v wrk >/dev/null || die "wrk is missing (Debian: apt-get install wrk); it is the load generator"
command -v "$caddy" >/dev/null || die "caddy is missing (Debian: apt-get install caddy; or CADDY=path); case (p) needs it"
command -v curl >/dev/null || die "curl is missing (Debian: apt-get install curl); it pairs the device and reads the headers"
command -v openssl >/dev/null || die "openssl is missing (Debian: apt-get install openssl); the peer's certificate needs it"
for tool in cargo python3; do
  command -v "$tool" >/dev/null || die "$tool is missing"
done
if [ -n "$peer_src" ]; then
  for tool in node npm; do
    command -v "$tool" >/dev/null || die "$tool is missing; PEER_DIR's case (o) needs it"
  done
fi
[ "$seconds" -ge 1 ] 2>/dev/null || die "the first argument is the seconds per case (a whole number, at least 1)"
[ "$rounds" -ge 1 ] 2>/dev/null || die "ROUNDS must be a whole number, at least 1"

if [ -n "${GATEHOUSE_BIN:-}" ]; then
  bin=$GATEHOUSE_BIN # e.g. a build with symbols, for profiling (bench/README.md)
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

# User + system CPU time of a process so far, in clock ticks (/proc/PID/stat fields 14, 15).
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# CPU time the whole machine spent busy so far, in clock ticks (/proc/stat: user, nice,
# system, irq, softirq, steal).
busy_ticks() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }

# Waits (at most 90 s) for the 1-minute load average to fall below 1, so that a build
# or the previous case does not weigh on the next one; then reports the load.
settle() {
  for _ in $(seq 1 18); do
    awk '{ exit !($1 < 1.0) }' /proc/loadavg && break
    sleep 5
  done
  cut -d' ' -f1 /proc/loadavg >"$tmp/load-$1.txt"
  say "load before ($1): $(cut -d' ' -f1-3 /proc/loadavg)"
}

# run CASE URL PID [wrk arguments...]: wrk_args against URL, counting the CPU time of PID.
run() {
  local name=$1 url=$2 pid=$3
  shift 3
  settle "$name"
  say "($name): wrk ${wrk_args[*]} $* $url"
  local busy_before cpu_before started TIMEFORMAT='%3U %3S'
  cpu_before=$(cpu_ticks "$pid")
  busy_before=$(busy_ticks)
  started=$(date +%s.%N)
  { time wrk "${wrk_args[@]}" "$@" "$url" >"$tmp/wrk-$name.txt"; } \
    2>"$tmp/time-$name.txt" || die "wrk failed"
  echo "$(($(cpu_ticks "$pid") - cpu_before))" >"$tmp/cpu-$name.txt"
  # The cores other processes (not this server, not wrk) used meanwhile.
  awk -v busy="$(($(busy_ticks) - busy_before))" -v ours="$(cat "$tmp/cpu-$name.txt")" \
    -v hz="$(getconf CLK_TCK)" -v started="$started" -v ended="$(date +%s.%N)" \
    '{ wrk = $1 + $2 } END { printf "%.2f\n", ((busy - ours) / hz - wrk) / (ended - started) }' \
    "$tmp/time-$name.txt" >"$tmp/others-$name.txt"
  cat "$tmp/wrk-$name.txt" >&2
  if grep -q 'Non-2xx' "$tmp/wrk-$name.txt"; then
    die "($name) answered some requests with an error status (see above)"
  fi
}

# The answer to `GET URL` over HTTP/1.1 as wrk sees it: the status line, then the header
# lines with lower-case names, sorted, without the per-response date and content-length,
# the x-request-id value replaced by its length; then the body.
normalized_answer() {
  curl -sk --http1.1 -D "$tmp/headers.txt" -o "$tmp/body.txt" "$1" || return 1
  python3 - "$tmp/headers.txt" "$tmp/body.txt" <<'PY'
import sys
lines = open(sys.argv[1], newline="").read().split("\r\n")
out = []
for line in lines[1:]:
    if not line:
        continue
    name, _, value = line.partition(":")
    name, value = name.strip().lower(), value.strip()
    if name in ("date", "content-length"):
        continue
    if name == "x-request-id":
        value = f"<{len(value)} characters>"
    out.append(f"{name}: {value}")
print(lines[0])
print("\n".join(sorted(out)))
print(open(sys.argv[2]).read())
PY
}

# ---------------------------------------------------------------------------------------
# gatehouse: one server for (t) and (i).

port=$(free_port)
data=$tmp/gatehouse.redb
url=https://127.0.0.1:$port
# wrk sends everything from one address and one client: the per-address and
# per-client limits (6000 a minute each by default) would measure the limiter instead.
GATEHOUSE_RATELIMIT_PER_IP=off GATEHOUSE_RATELIMIT_INTROSPECTION=off \
  env -u GATEHOUSE_BIN "$bin" serve --data "$data" --listen "127.0.0.1:$port" \
  >"$tmp/serve.out" 2>"$tmp/serve.err" &
server_pid=$!
pids+=("$server_pid")
for _ in $(seq 1 100); do
  grep -q '^gatehouse listening on' "$tmp/serve.out" 2>/dev/null && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$tmp/serve.err" >&2; die "gatehouse serve exited"; }
  sleep 0.1
done
grep -q '^gatehouse listening on' "$tmp/serve.out" || die "gatehouse did not start in 10 s"
admin=$(awk '$1 ~ /^gha_/ { print $1; exit }' "$tmp/serve.out")
[ -n "$admin" ] || die "no bootstrap admin token on stdout"

# An API client, through the admin socket since the server holds the data file.
env -u GATEHOUSE_BIN "$bin" clients create --name bench --data "$data" >"$tmp/client.out" 2>/dev/null ||
  die "clients create failed"
client_id=$(sed -n 's/^client_id=//p' "$tmp/client.out")
client_secret=$(sed -n 's/^client_secret=//p' "$tmp/client.out")
if [ -z "$client_id" ] || [ -z "$client_secret" ]; then
  die "clients create printed no credentials"
fi

# A paired device: bootstrap admin token -> pairing session -> /v1/pair.
session=$(curl -skf -X POST "$url/v1/pairing/sessions" \
  -H "Authorization: Bearer $admin" -H 'Content-Type: application/json' \
  -d '{"name":"bench"}') || die "cannot open a pairing session"
session_id=$(field session_id <<<"$session")
secret=$(field secret <<<"$session")
pair_body=$(python3 -c 'import json, sys; print(json.dumps({"session_id": sys.argv[1], "secret": sys.argv[2],
  "device": {"name": "bench phone", "platform": "android", "app_version": "1.0"}}))' "$session_id" "$secret")
pair=$(curl -skf -X POST "$url/v1/pair" -H 'Content-Type: application/json' -d "$pair_body") ||
  die "pairing failed"

AUTH="Basic $(printf '%s:%s' "$client_id" "$client_secret" | base64 -w0)"
TOKEN=$(field access_token <<<"$pair")
export AUTH TOKEN
introspect() {
  curl -skf -X POST "$url/v1/introspect" -H "Authorization: $AUTH" \
    -H 'Content-Type: application/x-www-form-urlencoded' -d "token=$TOKEN"
}
[ "$(introspect | field active)" = True ] || die "the access token does not introspect as active"

# ---------------------------------------------------------------------------------------
# Caddy: the same answer as gatehouse's /healthz.

normalized_answer "$url/healthz" >"$tmp/answer-t.txt" || die "GET /healthz failed"
head -n1 "$tmp/answer-t.txt" | grep -q '^HTTP/1.1 200' || die "/healthz did not answer 200"
curl -sk --http1.1 -D "$tmp/healthz-headers.txt" -o "$tmp/healthz-body.txt" "$url/healthz" ||
  die "GET /healthz failed"

p_port=$(free_port)
mkdir -p "$tmp/caddy"
python3 - "$tmp/healthz-headers.txt" "$tmp/healthz-body.txt" "$p_port" >"$tmp/caddy/Caddyfile" <<'PY'
import sys
headers, body, port = open(sys.argv[1], newline="").read(), open(sys.argv[2]).read(), sys.argv[3]
# Caddyfile tokens in backquotes are taken literally (no placeholders, quotes kept).
def quoted(text):
    if "`" in text or "\n" in text:
        sys.exit(f"cannot quote {text!r} for the Caddyfile")
    return f"`{text}`"
lines = []
for line in headers.split("\r\n")[1:]:
    if not line:
        continue
    name, _, value = line.partition(":")
    name, value = name.strip(), value.strip()
    if name.lower() in ("date", "content-length"):
        continue  # each server sends its own
    if name.lower() == "x-request-id":
        value = "0" * len(value)  # gatehouse makes one per response; the same length here
    lines.append(f"\t\t{name} {quoted(value)}")
print(f"""{{
	admin off
	local_certs
	skip_install_trust
	auto_https disable_redirects
	servers {{
		protocols h1 h2
	}}
}}
https://127.0.0.1:{port} {{
	tls internal
	header {{
		-Server
{chr(10).join(lines)}
	}}
	respond {quoted(body)} 200
}}""")
PY
HOME=$tmp/caddy XDG_DATA_HOME=$tmp/caddy XDG_CONFIG_HOME=$tmp/caddy \
  "$caddy" run --adapter caddyfile --config "$tmp/caddy/Caddyfile" >"$tmp/caddy/out" 2>&1 &
caddy_pid=$!
pids+=("$caddy_pid")
p_url=https://127.0.0.1:$p_port
for _ in $(seq 1 100); do
  curl -sk -o /dev/null "$p_url/healthz" 2>/dev/null && break
  kill -0 "$caddy_pid" 2>/dev/null || { tail -n 5 "$tmp/caddy/out" >&2; die "caddy exited"; }
  sleep 0.1
done
normalized_answer "$p_url/healthz" >"$tmp/answer-p.txt" || {
  tail -n 5 "$tmp/caddy/out" >&2
  die "caddy did not answer at $p_url within 10 s"
}
if ! diff -u "$tmp/answer-t.txt" "$tmp/answer-p.txt" >&2; then
  die "Caddy's answer differs from gatehouse's (above: - gatehouse, + caddy)"
fi
say "gatehouse and Caddy send the same status, headers (names, values, x-request-id length) and body:"
sed 's/^/    /' "$tmp/answer-t.txt" >&2

# ---------------------------------------------------------------------------------------
# The load: (t), (p), (i) in turn, ROUNDS times.

for round in $(seq 1 "$rounds"); do
  run "t$round" "$url/healthz" "$server_pid"
  run "p$round" "$p_url/healthz" "$caddy_pid"
  run "i$round" "$url/v1/introspect" "$server_pid" -s "$root/bench/introspect.lua"
done
[ "$(introspect | field active)" = True ] || die "the access token stopped introspecting as active"
stop "$caddy_pid"
stop "$server_pid"

# ---------------------------------------------------------------------------------------
# (o): the peer's own server.js and introspect.lua, the same wrk command.

if [ -n "$peer_src" ]; then
  for file in server.js package.json introspect.lua; do
    [ -f "$peer_src/$file" ] || die "PEER_DIR=$peer_src has no $file"
  done
  mkdir -p "$peer_dir"
  cp -f "$peer_src"/server.js "$peer_src"/package.json "$peer_src"/introspect.lua "$peer_dir"/
  chmod -R u+w "$peer_dir"
  if [ ! -d "$peer_dir/node_modules" ]; then
    say "installing the peer (npm install, once)"
    (cd "$peer_dir" && npm install --no-audit --no-fund >/dev/null 2>&1) || die "npm install failed"
  fi
  if [ ! -f "$peer_dir/cert.pem" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
      -keyout "$peer_dir/key.pem" -out "$peer_dir/cert.pem" -days 30 -subj /CN=127.0.0.1 \
      -addext subjectAltName=IP:127.0.0.1 2>/dev/null || die "openssl could not make the peer's certificate"
  fi
  o_port=$(free_port)
  (cd "$peer_dir" && PORT=$o_port exec node server.js) >"$tmp/peer.out" 2>&1 &
  peer_pid=$!
  pids+=("$peer_pid")
  o_url=https://127.0.0.1:$o_port
  # The peer's own client (see its run.sh) gets a token by client credentials.
  peer_auth="Basic $(printf 'rs:rs-secret-0123456789abcdef0123456789' | base64 -w0)"
  peer_token=
  for _ in $(seq 1 100); do
    peer_token=$(curl -sk -X POST "$o_url/token" -H "Authorization: $peer_auth" \
      -d grant_type=client_credentials 2>/dev/null | field access_token 2>/dev/null) && break
    kill -0 "$peer_pid" 2>/dev/null || { tail -n 5 "$tmp/peer.out" >&2; die "the peer exited"; }
    sleep 0.1
  done
  [ -n "$peer_token" ] || die "the peer gave no access token"
  active=$(curl -skf -X POST "$o_url/token/introspection" -H "Authorization: $peer_auth" \
    -d "token=$peer_token" | field active) || die "the peer's introspection failed"
  [ "$active" = True ] || die "the peer's token does not introspect as active"
  AUTH=$peer_auth TOKEN=$peer_token run o "$o_url/token/introspection" "$peer_pid" \
    -s "$peer_dir/introspect.lua"
  stop "$peer_pid"
fi
say "load after the run: $(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------------------------------

echo
python3 - "$tmp" "$(getconf CLK_TCK)" "$rounds" <<'PY'
import os, re, statistics, sys

tmp, hz, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
unit = {"us": 1e-3, "ms": 1.0, "s": 1e3}

def read(name):
    text = open(f"{tmp}/wrk-{name}.txt").read()
    rate = float(re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M).group(1))
    count = int(re.search(r"^\s*(\d+) requests in", text, re.M).group(1))
    lat = {}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        lat[pct] = float(m.group(1)) * unit[m.group(2)]
    errors = re.search(r"Socket errors:.*", text)
    cpu = int(open(f"{tmp}/cpu-{name}.txt").read()) / hz / count * 1e6
    others = float(open(f"{tmp}/others-{name}.txt").read())
    load = float(open(f"{tmp}/load-{name}.txt").read())
    return dict(rate=rate, p50=lat["50"], p99=lat["99"], cpu=cpu, others=others,
                load=load, errors=errors.group(0) if errors else "")

names = {
    "t": "(t) gatehouse GET /healthz",
    "p": "(p) Caddy respond, same headers",
    "i": "(i) gatehouse POST /v1/introspect",
    "o": "(o) oidc-provider introspection",
}
runs = {c: [read(f"{c}{r}") for r in range(1, rounds + 1)] for c in "tpi"}
if os.path.exists(f"{tmp}/wrk-o.txt"):
    runs["o"] = [read("o")]

print(f"{'case':<36} {'load':>5} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'CPU/req':>9} {'others':>6}")
for r in range(rounds):
    for case in "tpi":
        x = runs[case][r]
        label = names[case] + (f" #{r + 1}" if rounds > 1 else "")
        print(f"{label:<36} {x['load']:>5.2f} {x['rate']:>9.0f} {x['p50']:>7.2f} {x['p99']:>7.2f} "
              f"{x['cpu']:>6.1f} us {x['others']:>6.2f}")
        if x["errors"]:
            print(f"    {x['errors']}")
if "o" in runs:
    x = runs["o"][0]
    print(f"{names['o']:<36} {x['load']:>5.2f} {x['rate']:>9.0f} {x['p50']:>7.2f} {x['p99']:>7.2f} "
          f"{x['cpu']:>6.1f} us {x['others']:>6.2f}")
print("load: 1-minute load average before the case; CPU/req: the server's user + system CPU "
      "time per request; others: cores used by other processes during the case")

def med(case, key):
    return statistics.median(x[key] for x in runs[case])

if rounds > 1:
    print(f"medians of {rounds} rounds:")
    for case in "tpi":
        print(f"  {names[case]:<34} {med(case, 'rate'):>9.0f} req/s, p50 {med(case, 'p50'):.2f} ms, "
              f"p99 {med(case, 'p99'):.2f} ms, {med(case, 'cpu'):.1f} us CPU per request")

def verdict(ok):
    return "met" if ok else "NOT met"

# Ratios of medians (with one round, of the one run); per round as well when there are several.
tp = med("t", "rate") / med("p", "rate")
it = med("i", "rate") / med("t", "rate")
print(f"t/p: {tp:.2f}x the rate (goal >= 1.4x: {verdict(tp >= 1.4)}); "
      f"CPU per request {med('p', 'cpu') / med('t', 'cpu'):.2f}x less than Caddy's")
print(f"i/t: {it * 100:.1f} % of the rate (goal >= 90 %: {verdict(it >= 0.9)}); "
      f"CPU per request {med('i', 'cpu'):.1f} us against {med('t', 'cpu'):.1f} us")
if rounds > 1:
    per_round = ", ".join(
        f"{runs['t'][r]['rate'] / runs['p'][r]['rate']:.2f}x / "
        f"{runs['i'][r]['rate'] / runs['t'][r]['rate'] * 100:.0f} %" for r in range(rounds))
    print(f"t/p and i/t per round: {per_round}")
if "o" in runs:
    io = med("i", "rate") / runs["o"][0]["rate"]
    print(f"i/o: {io:.2f}x the peer's rate (keep >= 6x: {verdict(io >= 6)}); "
          f"CPU per request {runs['o'][0]['cpu'] / med('i', 'cpu'):.2f}x less than the peer's")
else:
    print("i/o: PEER_DIR is not set, the peer was not measured")
PY
