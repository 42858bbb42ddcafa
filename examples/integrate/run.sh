#!/usr/bin/env bash
# Runs the integration examples (python/, node/, go/) against a live gatehouse: a fresh
# server on a temporary data file, devices paired through `gatehouse pair new` and
# POST /v1/pair, and each example app started as a real HTTP server and asked, with curl:
#
#   - a valid token is accepted (offline and through introspection), and the app's own
#     authorization answers 403 for another device's resource;
#   - no token, a token with alg "none", an HS256 token keyed with the public key, and a
#     token whose claims were changed are refused (401 with WWW-Authenticate);
#   - a token for another audience is refused (an app instance that expects another);
#   - a revoked device's token is refused through introspection, while the offline check
#     still accepts it (the trade-off docs/integrate.md describes);
#   - an expired token is refused (the server issues 1-minute tokens; the run waits for
#     the first one to expire, about a minute after pairing);
#   - after two key rotations, a token signed by a key the app has never seen is
#     accepted: the app fetched the JWKS again for the unknown kid.
#
# Every refusal is also matched against the reason the app logs, so a 401 for the wrong
# reason fails the run.
#
# Usage: examples/integrate/run.sh [BINARY]   (default target/debug/gatehouse, built if
# missing). Needs curl, openssl, python3 (with pip), node and npm (20 or newer), and Go
# with golang-jwt from Debian (golang-go, golang-github-golang-jwt-jwt-dev). Python
# packages are installed into target/integrate/python (pinned, requirements.txt), Node
# packages with npm ci.
#
# TLS is verified everywhere: the server's self-signed certificate, fetched with openssl
# s_client and checked against the SPKI pin the server prints, is the only certificate
# curl and the apps trust.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
examples=$root/examples/integrate

bin=${1:-target/debug/gatehouse}
if [ ! -x "$bin" ]; then
  cargo build --locked --bin gatehouse
fi
case "$bin" in /*) ;; *) bin=$root/$bin ;; esac

for tool in curl openssl python3 node npm go; do
  command -v "$tool" >/dev/null || {
    echo "missing $tool (see the usage above)" >&2
    exit 1
  }
done

work=$(mktemp -d)
pids=()
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$work"
}
trap cleanup EXIT

fail() {
  echo "FAIL: $*" >&2
  local log
  for log in "$work"/*.log; do
    [ -e "$log" ] || continue
    echo "== $(basename "$log")" >&2
    tail -n 30 "$log" >&2
  done
  exit 1
}

checks=0
pass() {
  checks=$((checks + 1))
  echo "ok $checks - $*"
}

# A value from a JSON document: json FILE EXPRESSION (Python, on the parsed document d).
json() {
  python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"
}

# A parameter of a pairing URI, percent-decoded.
uri_param() {
  python3 -c '
import sys, urllib.parse
query = urllib.parse.urlsplit(sys.argv[1]).query
values = urllib.parse.parse_qs(query, keep_blank_values=True, strict_parsing=True)
print(values[sys.argv[2]][0])' "$1" "$2"
}

# A JWT's header or claims, as one member: jwt_part TOKEN header|claims MEMBER.
jwt_part() {
  python3 -c '
import base64, json, sys
token, part, member = sys.argv[1:]
segment = token.split(".")[0 if part == "header" else 1]
print(json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))[member])' "$1" "$2" "$3"
}

echo "== docs/integrate.md"
# Every snippet the page shows ("From [`FILE`](…):" and a code block) is a verbatim
# excerpt of that file, so the page cannot drift from the code this run tests.
python3 - "$root/docs/integrate.md" "$root" <<'PY' || fail "docs/integrate.md shows code its files no longer have"
import re, sys
page, root = sys.argv[1:]
text = open(page).read()
snippets = re.findall(r"^From \[`([^`]+)`\]\([^)]*\):\n\n```[a-z]*\n(.*?)\n```$", text, re.M | re.S)
if not snippets:
    sys.exit("no snippets found")
bad = [path for path, code in snippets if code not in open(f"{root}/{path}").read()]
for path in bad:
    print(f"a snippet is not in {path}", file=sys.stderr)
sys.exit(1 if bad else 0)
PY
pass "docs/integrate.md: every snippet is an excerpt of its file"

echo "== dependencies"
python_deps=$root/target/integrate/python
stamp=$(cat "$examples/python/requirements.txt" <(python3 --version) | sha256sum | cut -c1-16)
if [ "$(cat "$python_deps/.stamp" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$python_deps"
  python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --no-warn-conflicts --root-user-action=ignore \
    --target "$python_deps" -r "$examples/python/requirements.txt"
  echo "$stamp" >"$python_deps/.stamp"
fi
(cd "$examples/node" && npm ci --no-audit --no-fund --silent)
"$examples/go/build.sh" "$work/go-example"

echo "== gatehouse"
# A clean environment for the server and the CLI: no inherited GATEHOUSE_* variable (an
# unknown one is a configuration error), no systemd directories, and an empty
# configuration file so that /etc/gatehouse/gatehouse.toml is not read.
: >"$work/gatehouse.toml"
server_env=(env)
while IFS='=' read -r name _; do
  case "$name" in
    GATEHOUSE_* | CREDENTIALS_DIRECTORY | STATE_DIRECTORY) server_env+=(-u "$name") ;;
  esac
done < <(env)
audience=https://api.example.test
server_env+=(
  GATEHOUSE_CONFIG="$work/gatehouse.toml"
  GATEHOUSE_LOG=warn
  GATEHOUSE_LOG_FORMAT=text
  # Tokens for this app (tokens.audience), living 1 minute (the shortest allowed), so
  # that the expiry check waits about a minute rather than 15.
  GATEHOUSE_AUDIENCE="$audience"
  GATEHOUSE_ACCESS_TTL=1m
)
gatehouse() {
  "${server_env[@]}" "$bin" --data "$work/gatehouse.redb" "$@"
}
: >"$work/server.out" # before the server starts, so that the wait below can read it
# Started as a simple command, not through the function above: then $! is the server's
# own process (env execs it), which the cleanup stops.
"${server_env[@]}" "$bin" --data "$work/gatehouse.redb" serve --listen 127.0.0.1:0 \
  >>"$work/server.out" 2>"$work/server.log" </dev/null &
pids+=($!)
server_pid=$!

url=
for _ in $(seq 1 300); do
  url=$(sed -n 's/^gatehouse listening on \(https:\/\/[0-9.:]*\).*/\1/p' "$work/server.out" | head -n1)
  [ -n "$url" ] && break
  kill -0 "$server_pid" 2>/dev/null || fail "gatehouse exited before serving: $(cat "$work/server.out")"
  sleep 0.1
done
[ -n "$url" ] || fail "gatehouse did not print its address in 30 s"
printed_pin=$(sed -n 's/.*SPKI pin \(sha256\/[A-Za-z0-9+\/=]*\).*/\1/p' "$work/server.out" | head -n1)

# The certificate the server presents, trusted only if its key is the one it printed.
ca=$work/gatehouse.pem
openssl s_client -connect "${url#https://}" </dev/null 2>/dev/null | openssl x509 -outform PEM >"$ca"
pin=sha256/$(openssl x509 -in "$ca" -pubkey -noout | openssl pkey -pubin -outform der |
  openssl dgst -sha256 -binary | base64)
if [ -z "$printed_pin" ] || [ "$pin" != "$printed_pin" ]; then
  fail "the served certificate's pin $pin is not the printed one ($printed_pin)"
fi
pass "gatehouse at $url; its certificate matches the printed pin"

# The API client that introspects (HTTP Basic).
gatehouse clients create --name integrate-examples >"$work/client.txt" 2>/dev/null
client_id=$(sed -n 's/^client_id=//p' "$work/client.txt")
client_secret=$(sed -n 's/^client_secret=//p' "$work/client.txt")
if [ -z "$client_id" ] || [ -z "$client_secret" ]; then
  fail "clients create printed no credentials"
fi

# Pairs a device: an operator opens a session (CLI, over the admin socket), the app
# claims it with the URI's session and secret. The answer goes to $work/NAME.json.
pair_device() {
  local name=$1 uri
  uri=$(gatehouse pair new --name "$name" 2>/dev/null | tail -n1)
  [[ $uri == gatehouse://pair\?* ]] || fail "pair new printed no pairing URI: $uri"
  [ "$(uri_param "$uri" server)" = "$url" ] || fail "the pairing URI names another server: $uri"
  [ "$(uri_param "$uri" pin)" = "$pin" ] || fail "the pairing URI carries another pin: $uri"
  curl -fsS --cacert "$ca" -X POST "$url/v1/pair" -H 'content-type: application/json' \
    -d "{\"session_id\":\"$(uri_param "$uri" session)\",\"secret\":\"$(uri_param "$uri" secret)\",
         \"device\":{\"name\":\"$name\",\"platform\":\"linux\",\"app_version\":\"1.0\"}}" \
    >"$work/$name.json" || fail "POST /v1/pair failed for $name"
}
pair_device ada
pair_device bob
ada=$(json "$work/ada.json" 'd["device_id"]')
ada_token=$(json "$work/ada.json" 'd["access_token"]')
bob=$(json "$work/bob.json" 'd["device_id"]')
bob_token=$(json "$work/bob.json" 'd["access_token"]')
[ "$(jwt_part "$ada_token" claims aud)" = "$audience" ] || fail "the token's aud is not $audience"
pass "paired $ada and $bob"

curl -fsS --cacert "$ca" "$url/.well-known/jwks.json" >"$work/jwks-before.json"
kids_before=$(json "$work/jwks-before.json" '" ".join(k["kid"] for k in d["keys"])')

echo "== example apps"
declare -A app_port
start_app() { # NAME AUDIENCE COMMAND...
  local name=$1 app_audience=$2 port=
  shift 2
  : >"$work/$name.log" # before the app starts, so that the wait below can read it
  # A simple command: $! is the app's own process (env execs it), which the cleanup stops.
  env AUTH_ISSUER="$url" AUTH_AUDIENCE="$app_audience" AUTH_CA_FILE="$ca" \
    AUTH_CLIENT_ID="$client_id" AUTH_CLIENT_SECRET="$client_secret" \
    AUTH_LEEWAY_SECONDS=0 PORT=0 PYTHONPATH="$python_deps" \
    "$@" >>"$work/$name.log" 2>&1 </dev/null &
  pids+=($!)
  for _ in $(seq 1 200); do
    port=$(sed -n 's/^listening on http:\/\/127\.0\.0\.1:\([0-9]*\)$/\1/p' "$work/$name.log" | head -n1)
    [ -n "$port" ] && break
    kill -0 "$!" 2>/dev/null || fail "$name exited before listening"
    sleep 0.1
  done
  [ -n "$port" ] || fail "$name did not listen within 20 s"
  app_port[$name]=$port
}
apps=(python node go)
start_app python "$audience" python3 "$examples/python/app.py"
start_app node "$audience" node "$examples/node/app.mjs"
start_app go "$audience" "$work/go-example"
# The same apps, expecting another audience than the server issues.
start_app python-other-aud https://other.example.test python3 "$examples/python/app.py"
start_app node-other-aud https://other.example.test node "$examples/node/app.mjs"
start_app go-other-aud https://other.example.test "$work/go-example"
pass "apps listening: $(for a in "${!app_port[@]}"; do printf '%s:%s ' "$a" "${app_port[$a]}"; done)"

# expect APP STATUS PATH TOKEN [REASON|DEVICE]: asks APP for PATH with TOKEN (none when
# empty). A 200 must name DEVICE; a 401 for a presented token must carry the
# invalid_token challenge, and the app must log REASON for it.
expect() {
  local app=$1 want=$2 path=$3 token=$4 detail=${5:-} got before after
  local auth=()
  [ -n "$token" ] && auth=(-H "Authorization: Bearer $token")
  before=$(grep -c "gatehouse token refused: reason=$detail\$" "$work/$app.log" || true)
  got=$(curl -sS -o "$work/body" -D "$work/headers" -w '%{http_code}' "${auth[@]}" \
    "http://127.0.0.1:${app_port[$app]}$path") || fail "$app: $path: no answer"
  [ "$got" = "$want" ] || fail "$app: $path answered $got, expected $want: $(cat "$work/body")"
  case "$want" in
    200)
      [ "$(json "$work/body" 'd["device_id"]')" = "$detail" ] ||
        fail "$app: $path answered for another device: $(cat "$work/body")"
      ;;
    401)
      if [ -z "$token" ]; then
        grep -qi '^www-authenticate: Bearer realm="api"' "$work/headers" ||
          fail "$app: a 401 without WWW-Authenticate: Bearer"
      else
        grep -qi '^www-authenticate: Bearer .*error="invalid_token"' "$work/headers" ||
          fail "$app: a 401 without the invalid_token challenge"
        after=$(grep -c "gatehouse token refused: reason=$detail\$" "$work/$app.log" || true)
        [ "$after" -gt "$before" ] ||
          fail "$app: $path refused the token, but not for reason=$detail"
      fi
      ;;
  esac
}

for app in "${apps[@]}"; do
  expect "$app" 200 /me "$ada_token" "$ada"
  expect "$app" 200 /me/live "$ada_token" "$ada"
  expect "$app" 401 /me ""
  expect "$app" 200 "/devices/$ada/notes" "$ada_token" "$ada"
  expect "$app" 403 "/devices/$bob/notes" "$ada_token"
  pass "$app: accepts a valid token (offline and introspected); 401 without one; 403 for another device's notes"
done

# Forged tokens: Ada's claims under alg "none", under HS256 keyed with the signing key's
# public bytes (the key-confusion attack), and with a changed sub under Ada's signature.
forge() {
  python3 - "$1" "$2" "$work/jwks-before.json" <<'PY'
import base64, hashlib, hmac, json, sys
kind, token, jwks = sys.argv[1:]
def b64(data): return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
def unb64(text): return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
header_b64, claims_b64, signature = token.split(".")
header = json.loads(unb64(header_b64))
claims = json.loads(unb64(claims_b64))
if kind == "none":
    header["alg"] = "none"
    print(f'{b64(json.dumps(header).encode())}.{claims_b64}.')
elif kind == "hs256":
    key = next(k for k in json.load(open(jwks))["keys"] if k["kid"] == header["kid"])
    header["alg"] = "HS256"
    signing_input = f'{b64(json.dumps(header).encode())}.{claims_b64}'
    mac = hmac.new(unb64(key["x"]), signing_input.encode(), hashlib.sha256).digest()
    print(f"{signing_input}.{b64(mac)}")
elif kind == "tampered":
    claims["sub"] = "dev_" + "0" * 32
    print(f'{header_b64}.{b64(json.dumps(claims, separators=(",", ":")).encode())}.{signature}')
PY
}
none_token=$(forge none "$ada_token")
hs256_token=$(forge hs256 "$ada_token")
tampered_token=$(forge tampered "$ada_token")
for app in "${apps[@]}"; do
  expect "$app" 401 /me "$none_token" algorithm
  expect "$app" 401 /me "$hs256_token" algorithm
  expect "$app" 401 /me "$tampered_token" bad_signature
  expect "$app-other-aud" 401 /me "$ada_token" wrong_audience
  pass "$app: refuses alg none, HS256 with the public key, changed claims, and another audience"
done

# Revocation: introspection sees it at once; the offline check cannot.
for app in "${apps[@]}"; do
  expect "$app" 200 /me/live "$bob_token" "$bob"
done
gatehouse devices revoke "$bob" >/dev/null 2>&1 || fail "devices revoke $bob failed"
for app in "${apps[@]}"; do
  expect "$app" 401 /me/live "$bob_token" inactive
  expect "$app" 200 /me "$bob_token" "$bob"
  pass "$app: a revoked device's token is refused through introspection (offline still accepts it until exp)"
done

# Expiry: Ada's first token lives one minute; the apps tolerate no leeway in this run.
exp=$(jwt_part "$ada_token" claims exp)
wait_s=$((exp + 1 - $(date +%s)))
if [ "$wait_s" -gt 0 ]; then
  echo "waiting ${wait_s}s for the first token to expire"
  sleep "$wait_s"
fi
for app in "${apps[@]}"; do
  expect "$app" 401 /me "$ada_token" expired
  expect "$app" 401 /me/live "$ada_token" expired
  pass "$app: refuses an expired token"
done

# Key rotation: two rotations make active a key that was not in the JWKS the apps hold
# (the first one publishes it as the next key); the refreshed token is signed with it.
gatehouse keys rotate --now >/dev/null 2>&1 || fail "keys rotate failed"
gatehouse keys rotate --now >/dev/null 2>&1 || fail "keys rotate failed"
curl -fsS --cacert "$ca" -X POST "$url/v1/token" \
  --data-urlencode grant_type=refresh_token \
  --data-urlencode "refresh_token=$(json "$work/ada.json" 'd["refresh_token"]')" \
  >"$work/ada-2.json" || fail "refresh failed"
ada_token_2=$(json "$work/ada-2.json" 'd["access_token"]')
new_kid=$(jwt_part "$ada_token_2" header kid)
case " $kids_before " in
  *" $new_kid "*) fail "the rotated key $new_kid was already in the JWKS the apps fetched" ;;
esac
for app in "${apps[@]}"; do
  expect "$app" 200 /me "$ada_token_2" "$ada"
  pass "$app: accepts a token signed by a key it had not seen (JWKS fetched again for kid $new_kid)"
done

if grep -n "panicked" "$work/server.log" >&2; then
  fail "the server panicked"
fi
echo "all $checks checks passed"
