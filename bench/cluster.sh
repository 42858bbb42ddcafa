#!/usr/bin/env bash
# gatehouse on several nodes sharing one PostgreSQL database, beside one node on a data
# file, in one run (benches/cluster_load.rs): durable revocations per second over HTTPS,
# their latency, how long a revocation on one node takes to be refused by another, and
# introspections per second on each node.
#
#   bench/cluster.sh            # CLUSTER_NODES=3 CLUSTER_TOKENS=20000 CLUSTER_CLIENTS=48
#
# Starts a fresh PostgreSQL 15 (Debian's) in a temporary directory on a free port: fsync
# on, shared_buffers 128MB, 100 connections, everything else as initdb leaves it; a role
# and a database for gatehouse with a password (scram-sha-256 over TCP). PostgreSQL
# refuses to run as root: as root the script runs it as the user `postgres` (setpriv).
# It is stopped and removed at exit. Needs: PostgreSQL 15 (postgresql), setpriv, cargo.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin=${PG_BIN:-/usr/lib/postgresql/15/bin}
[ -x "$bin/initdb" ] || { echo "needs PostgreSQL 15 in $bin (the Debian package postgresql)" >&2; exit 1; }

dir=$(mktemp -d /tmp/gatehouse-cluster-bench.XXXXXX)
chmod 755 "$dir"
as_pg=()
if [ "$(id -u)" = 0 ]; then
  chown postgres: "$dir"
  as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups)
fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
password=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')

cleanup() {
  "${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT

"${as_pg[@]}" "$bin/initdb" -D "$dir/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
  --locale=C -E UTF8 >/dev/null
cat >> "$dir/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
shared_buffers = 128MB
max_connections = 100
CONF
"${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w start >/dev/null
psql=("${as_pg[@]}" "$bin/psql" -h "$dir" -p "$port" -U postgres -X -q -v ON_ERROR_STOP=1)
"${psql[@]}" -c "CREATE ROLE gatehouse LOGIN PASSWORD '$password'"
"${psql[@]}" -c "CREATE DATABASE gatehouse OWNER gatehouse"
printf '%s' "$password" > "$dir/password"
chmod 644 "$dir/password"

echo "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (fsync on)"
cd "$root"
CLUSTER_STORAGE="postgres://gatehouse@127.0.0.1:$port/gatehouse" \
CLUSTER_PASSWORD_FILE="$dir/password" \
  cargo bench --bench cluster_load
