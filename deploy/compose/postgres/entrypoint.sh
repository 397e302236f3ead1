#!/usr/bin/env bash
# The Compose stack's PostgreSQL: on first start (empty data directory) initdb, then the
# gateway's login role (POSTGRES_GATEWAY_USER, password POSTGRES_GATEWAY_PASSWORD) owning the
# database `app` with a small `customers` table; then postgres in the foreground as user
# postgres, logging every statement (log_statement=all) to stderr, i.e. `docker-compose logs`.
set -euo pipefail
data=/var/lib/postgresql/data
: "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required (the superuser postgres)}"
: "${POSTGRES_GATEWAY_PASSWORD:?POSTGRES_GATEWAY_PASSWORD is required}"
gateway_user="${POSTGRES_GATEWAY_USER:-vigil_gateway}"
[[ "$gateway_user" =~ ^[a-z_][a-z0-9_]*$ ]] || { echo "POSTGRES_GATEWAY_USER must be a plain identifier" >&2; exit 2; }

as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; }

if [[ ! -s "$data/PG_VERSION" ]]; then
  install -d -o postgres -g postgres -m 700 "$data"
  pwfile="$(mktemp)"
  printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
  chown postgres "$pwfile"
  as_postgres initdb -D "$data" -U postgres --pwfile="$pwfile" --auth-host=scram-sha-256 \
    --auth-local=peer -E UTF8 --locale=C.UTF-8 >/dev/null
  rm -f "$pwfile"
  cat >>"$data/postgresql.conf" <<CONF
listen_addresses = '*'
password_encryption = 'scram-sha-256'
log_statement = 'all'
log_line_prefix = '%m [%p] db=%d user=%u app=%a '
log_connections = on
CONF
  printf 'local all all peer\nhost all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n' \
    >"$data/pg_hba.conf"
  # provisioning on the socket only, so nothing connects before it is done
  as_postgres pg_ctl -D "$data" -o "-c listen_addresses=''" -w start >/dev/null
  as_postgres psql -q -v ON_ERROR_STOP=1 -v pw="$POSTGRES_GATEWAY_PASSWORD" -d postgres <<SQL
CREATE ROLE $gateway_user LOGIN PASSWORD :'pw';
CREATE DATABASE app OWNER $gateway_user;
\\connect app
SET ROLE $gateway_user;
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, email text, tier text NOT NULL DEFAULT 'basic');
INSERT INTO customers (id, name, email)
  VALUES (1, 'Ada Lovelace', 'ada@example.com'), (2, 'Alan Turing', 'alan@example.com'),
         (3, 'Grace Hopper', 'grace@example.com');
SQL
  as_postgres pg_ctl -D "$data" -m fast -w stop >/dev/null
fi
exec setpriv --reuid=postgres --regid=postgres --init-groups -- postgres -D "$data"
