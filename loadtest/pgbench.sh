#!/usr/bin/env bash
# Side-by-side pgbench: direct PostgreSQL, PgBouncer and the Vigil gateway (audit on).
#
#   loadtest/pgbench.sh            # defaults: 3 rounds x 10 s per target and mode
#   DURATION=5 ROUNDS=2 loadtest/pgbench.sh
#
# Run as root on the dev machine (see loadtest/README.md). It reuses the dev servers of
# deploy/dev/servers.sh when they run, otherwise starts them and stops them at the end; it
# builds the release gateway, starts it and a PgBouncer in a temporary directory, runs
# `pgbench -S` (select-only, held connections) interleaved over the targets, prints a table
# and checks the gateway's audit log with `vigil audit verify`. Everything it started is
# stopped on exit. It reports only: the goals never change the exit status; a failed audit
# verification or a failed pgbench run does (exit 1).
#
# Settings (environment):
#   DURATION=10          seconds per pgbench run
#   ROUNDS=3             interleaved rounds; the table shows the median per target and mode
#   CLIENTS=8 THREADS=2  pgbench -c / -j
#   WARMUP=3             seconds of unlogged warm-up per target before round 1 (0: none)
#   MODES="simple prepared"
#   TARGETS="direct-plain direct-tls pgbouncer vigil vigil-guarded"
#   VIGIL_PORT=16433 VIGIL_ADMIN_PORT=19188 PGBOUNCER_PORT=16434   (127.0.0.1)
#   VIGIL_DEV_DIR=/tmp/vigil-dev   dev servers' state dir (servers.sh)
#   CARGO_TARGET_DIR=/var/cache/vigil/target   SKIP_BUILD=1 uses the binaries already there
#   KEEP_WORKDIR=1       keep the temporary directory (logs, pgbench logs, audit log)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

DURATION="${DURATION:-10}"
ROUNDS="${ROUNDS:-3}"
CLIENTS="${CLIENTS:-8}"
THREADS="${THREADS:-2}"
WARMUP="${WARMUP:-3}"
read -r -a MODES <<<"${MODES:-simple prepared}"
read -r -a TARGETS <<<"${TARGETS:-direct-plain direct-tls pgbouncer vigil vigil-guarded}"
VIGIL_PORT="${VIGIL_PORT:-16433}"
VIGIL_ADMIN_PORT="${VIGIL_ADMIN_PORT:-19188}"
PGBOUNCER_PORT="${PGBOUNCER_PORT:-16434}"
dev_dir="${VIGIL_DEV_DIR:-/tmp/vigil-dev}"
target_dir="${CARGO_TARGET_DIR:-/var/cache/vigil/target}"
SKIP_BUILD="${SKIP_BUILD:-0}"
KEEP_WORKDIR="${KEEP_WORKDIR:-0}"

# The issue's goals (reported, never enforced).
GOAL_VS_DIRECT=0.75
GOAL_VS_PGBOUNCER=1.0
GOAL_CPU_US=25

log() { printf 'pgbench.sh: %s\n' "$*" >&2; }
die() { printf 'pgbench.sh: ERROR: %s\n' "$*" >&2; exit 1; }
show_log() {
  if [[ -f "$1" ]]; then
    printf -- '----- last lines of %s -----\n' "$1" >&2
    tail -n "${2:-30}" "$1" >&2 || true
  fi
}

for v in DURATION ROUNDS CLIENTS THREADS WARMUP VIGIL_PORT VIGIL_ADMIN_PORT PGBOUNCER_PORT; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a whole number (got '${!v}')"
done
((DURATION > 0 && ROUNDS > 0 && CLIENTS > 0 && THREADS > 0)) || die "DURATION, ROUNDS, CLIENTS, THREADS must be > 0"
for t in "${TARGETS[@]}"; do
  case "$t" in direct-plain | direct-tls | pgbouncer | vigil | vigil-guarded) ;; *) die "unknown target '$t'" ;; esac
done
for m in "${MODES[@]}"; do
  case "$m" in simple | prepared | extended) ;; *) die "unknown mode '$m'" ;; esac
done
[[ "$(id -u)" == 0 ]] || die "run as root (the dev servers and PgBouncer run as user postgres)"

# ---------------------------------------------------------------------------- cleanup
work=""
vigil_pid=""
bouncer_pid=""
started_servers=0

proc_alive() {
  local state
  state="$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null)" || return 1
  [[ -n "$state" && "$state" != Z && "$state" != X ]]
}

stop_pid() { # pid name
  local pid="$1" i
  [[ -n "$pid" ]] && proc_alive "$pid" || return 0
  log "stopping $2 (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 150); do proc_alive "$pid" || return 0; sleep 0.1; done
  log "$2 did not exit on SIGTERM; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  set +e
  stop_pid "$vigil_pid" vigil-node
  stop_pid "$bouncer_pid" pgbouncer
  if ((started_servers)); then
    log "stopping the dev servers this script started"
    VIGIL_DEV_DIR="$dev_dir" "$repo/deploy/dev/servers.sh" stop
  fi
  if [[ -n "$work" && -d "$work" ]]; then
    if [[ "$KEEP_WORKDIR" == 1 ]]; then
      log "kept $work"
    else
      rm -rf -- "$work"
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------- prerequisites
pg_bin=/usr/lib/postgresql/15/bin
if [[ ! -x "$pg_bin/pgbench" || ! -x /usr/sbin/pgbouncer || ! -d "$repo/deploy/dev/oidc/node_modules/oidc-provider" ]]; then
  log "prerequisites missing: running deploy/dev/setup.sh"
  "$repo/deploy/dev/setup.sh"
fi

port_free() { ! ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }
for p in VIGIL_PORT VIGIL_ADMIN_PORT PGBOUNCER_PORT; do
  port_free "${!p}" || die "port ${!p} ($p) is in use on this machine; choose another with $p=..."
done

# ---------------------------------------------------------------------------- dev servers
status_out="$(VIGIL_DEV_DIR="$dev_dir" "$repo/deploy/dev/servers.sh" status 2>/dev/null || true)"
pg_up=0 oidc_up=0
grep -q '^postgresql  running' <<<"$status_out" && pg_up=1
grep -q '^oidc        running' <<<"$status_out" && oidc_up=1
if ((pg_up && oidc_up)); then
  log "reusing the dev servers in $dev_dir"
elif ((!pg_up && !oidc_up)); then
  log "starting the dev servers in $dev_dir (stopped again at the end)"
  started_servers=1
  VIGIL_DEV_DIR="$dev_dir" "$repo/deploy/dev/servers.sh" start
else
  die "only one of the dev servers in $dev_dir runs; fix that with deploy/dev/servers.sh start (it is not ours to stop), or use another VIGIL_DEV_DIR and ports"
fi
# This also provisions the bench database when servers run but it is missing (idempotent).
[[ -f "$dev_dir/env" ]] || VIGIL_DEV_DIR="$dev_dir" "$repo/deploy/dev/servers.sh" start
# shellcheck disable=SC1091
source "$dev_dir/env"
pg_bin="${VIGIL_PG_BIN:-$pg_bin}"
node_bin="${VIGIL_NODE:-$(command -v node || true)}"
[[ -x "$node_bin" ]] || die "Node.js not found (VIGIL_NODE); run deploy/dev/setup.sh"

# ---------------------------------------------------------------------------- build
if [[ "$SKIP_BUILD" != 1 ]]; then
  log "building the release gateway (CARGO_TARGET_DIR=$target_dir; may wait for another build's lock)"
  (cd "$repo" && CARGO_TARGET_DIR="$target_dir" cargo build --release -p vigil-node --bins) \
    || die "cargo build failed"
fi
vigil_node="$target_dir/release/vigil-node"
vigil_cli="$target_dir/release/vigil"
[[ -x "$vigil_node" && -x "$vigil_cli" ]] || die "$vigil_node or $vigil_cli missing (build first, or unset SKIP_BUILD)"

# ---------------------------------------------------------------------------- work dir
work="$(mktemp -d /tmp/vigil-pgbench.XXXXXX)"
chmod 755 "$work"
mkdir -p "$work/runs" "$work/vigil/data"
results="$work/results.tsv" # round target mode tps lat_avg_ms txns cpu_ticks audit_ticks ctx_switches
: >"$results"

# ---------------------------------------------------------------------------- Vigil
(umask 077; printf '%s' "$VIGIL_PG_GATEWAY_PASSWORD" >"$work/vigil/pg-password")
cat >"$work/vigil/vigil.toml" <<EOF
[node]
id = "bench-1"
data_dir = "$work/vigil/data"
[admin]
listen = "127.0.0.1:$VIGIL_ADMIN_PORT"
[log]
level = "info"
[identity]
issuer = "$VIGIL_OIDC_ISSUER"
audiences = ["${VIGIL_OIDC_AUDIENCE:-urn:vigil:gateway}"]
[audit]
max_result_bytes = 65536
[postgres]
listen = "127.0.0.1:$VIGIL_PORT"
[[postgres.connections]]
name = "bench"
host = "$VIGIL_PG_HOST"
port = $VIGIL_PG_PORT
database = "bench"
user = "$VIGIL_PG_GATEWAY_USER"
password = { file = "$work/vigil/pg-password" }
allow = { any_authenticated = true }

# The same database behind guardrails and masking (target vigil-guarded), in the same process.
[[postgres.connections]]
name = "bench_guarded"
host = "$VIGIL_PG_HOST"
port = $VIGIL_PG_PORT
database = "bench"
user = "$VIGIL_PG_GATEWAY_USER"
password = { file = "$work/vigil/pg-password" }
allow = { any_authenticated = true }

[[policy.rules]]
id = "no-destruction"
action = "block"
connections = ["bench_guarded"]
flags = ["drop", "truncate", "alter", "delete_without_where", "update_without_where"]
[[policy.rules]]
id = "no-escape"
action = "block"
connections = ["bench_guarded"]
flags = ["copy_program", "server_file", "dangerous_function", "role_change", "procedural"]
[[policy.rules]]
id = "no-history-writes"
action = "require_approval"
connections = ["bench_guarded"]
kinds = ["write"]
tables = ["pgbench_history"]
approval = { approvers = "dba", wait_secs = 0 }
[[policy.masking.columns]]
connections = ["bench_guarded"]
table = "pgbench_accounts"
column = "abalance"
method = "token"
EOF

log "starting vigil-node on 127.0.0.1:$VIGIL_PORT (admin $VIGIL_ADMIN_PORT)"
"$vigil_node" --config "$work/vigil/vigil.toml" </dev/null >"$work/vigil/vigil.log" 2>&1 &
vigil_pid=$!
ready=0
for _ in $(seq 1 150); do
  proc_alive "$vigil_pid" || break
  if curl -fsS -m 1 -o /dev/null "http://127.0.0.1:$VIGIL_ADMIN_PORT/readyz" 2>/dev/null \
     && "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$VIGIL_PORT" -t 1; then
    ready=1; break
  fi
  sleep 0.1
done
((ready)) || { show_log "$work/vigil/vigil.log"; die "vigil-node did not become ready"; }

# ---------------------------------------------------------------------------- PgBouncer
bdir="$work/pgbouncer"
install -d -o postgres -g postgres -m 700 "$bdir"
printf '"%s" "%s"\n' "$VIGIL_PG_GATEWAY_USER" "$VIGIL_PG_GATEWAY_PASSWORD" >"$bdir/userlist.txt"
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=127.0.0.1" \
  -keyout "$bdir/client-tls.key" -out "$bdir/client-tls.crt" >"$bdir/openssl.log" 2>&1 \
  || { show_log "$bdir/openssl.log"; die "openssl failed"; }
cat >"$bdir/pgbouncer.ini" <<EOF
[databases]
bench = host=$VIGIL_PG_HOST port=$VIGIL_PG_PORT dbname=bench

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGBOUNCER_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $bdir/userlist.txt
pool_mode = session
max_client_conn = 200
default_pool_size = 50
ignore_startup_parameters = extra_float_digits
; the client leg is TLS, like Vigil's; the server leg is plain, like Vigil's default
client_tls_sslmode = require
client_tls_key_file = $bdir/client-tls.key
client_tls_cert_file = $bdir/client-tls.crt
server_tls_sslmode = disable
logfile = $bdir/pgbouncer.log
pidfile = $bdir/pgbouncer.pid
log_connections = 0
log_disconnections = 0
EOF
chown postgres:postgres "$bdir"/*
chmod 600 "$bdir/userlist.txt" "$bdir/client-tls.key"

log "starting pgbouncer on 127.0.0.1:$PGBOUNCER_PORT (pool_mode=session, as user postgres)"
runuser -u postgres -- /usr/sbin/pgbouncer -d -q "$bdir/pgbouncer.ini" >"$bdir/start.log" 2>&1 \
  || { show_log "$bdir/start.log"; show_log "$bdir/pgbouncer.log"; die "pgbouncer failed to start"; }
for _ in $(seq 1 50); do [[ -s "$bdir/pgbouncer.pid" ]] && break; sleep 0.1; done
bouncer_pid="$(cat "$bdir/pgbouncer.pid" 2>/dev/null || true)"
[[ -n "$bouncer_pid" ]] && proc_alive "$bouncer_pid" || { show_log "$bdir/pgbouncer.log"; die "pgbouncer did not start"; }
for _ in $(seq 1 50); do "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$PGBOUNCER_PORT" -t 1 && break; sleep 0.1; done

# ---------------------------------------------------------------------------- targets
token=""
token_at=0
fresh_token() { # the dev provider's tokens live 600 s; the gateway checks them at login
  if ((SECONDS - token_at > 240)) || [[ -z "$token" ]]; then
    token="$("$node_bin" "$VIGIL_OIDC_DIR/token.mjs" --issuer "$VIGIL_OIDC_ISSUER" \
      --client agent-reporting --secret agent-reporting-secret)" || die "could not get an access token"
    token_at=$SECONDS
  fi
}

# Sets conn_env (array of NAME=value) and proxy_pid for a target.
target_env() {
  proxy_pid=""
  case "$1" in
    direct-plain) conn_env=(PGHOST="$VIGIL_PG_HOST" PGPORT="$VIGIL_PG_PORT" PGSSLMODE=disable
                            PGUSER="$VIGIL_PG_GATEWAY_USER" PGPASSWORD="$VIGIL_PG_GATEWAY_PASSWORD") ;;
    direct-tls) conn_env=(PGHOST="$VIGIL_PG_HOST" PGPORT="$VIGIL_PG_PORT" PGSSLMODE=require
                          PGUSER="$VIGIL_PG_GATEWAY_USER" PGPASSWORD="$VIGIL_PG_GATEWAY_PASSWORD") ;;
    pgbouncer) conn_env=(PGHOST=127.0.0.1 PGPORT="$PGBOUNCER_PORT" PGSSLMODE=require
                         PGUSER="$VIGIL_PG_GATEWAY_USER" PGPASSWORD="$VIGIL_PG_GATEWAY_PASSWORD")
               proxy_pid="$bouncer_pid" ;;
    vigil | vigil-guarded) fresh_token
           conn_env=(PGHOST=127.0.0.1 PGPORT="$VIGIL_PORT" PGSSLMODE=require
                     PGUSER=bench-agent PGPASSWORD="$token")
           proxy_pid="$vigil_pid" ;;
  esac
  local db=bench
  [[ "$1" == vigil-guarded ]] && db=bench_guarded
  conn_env+=(PGDATABASE="$db" PGCONNECT_TIMEOUT=10)
}

# utime + stime (clock ticks) from a /proc stat file: of a process (all its threads) or one task
cpu_ticks() {
  local stat
  stat="$(cat "$1")" || die "$1 is gone"
  stat="${stat##*) }" # fields from 3 on: state is $1, utime is $12, stime is $13
  awk '{ print $12 + $13 }' <<<"$stat"
}

# "process_ticks audit_thread_ticks context_switches" of a proxy process. The audit thread is
# Vigil's `vigil-audit`; context switches are summed over the live threads.
proc_sample() {
  local pid="$1" total audit=0 t
  total="$(cpu_ticks "/proc/$pid/stat")"
  for t in /proc/"$pid"/task/*; do
    [[ "$(cat "$t/comm" 2>/dev/null)" == vigil-audit ]] && audit=$((audit + $(cpu_ticks "$t/stat")))
  done
  printf '%s %s %s\n' "$total" "$audit" \
    "$(awk '/^(voluntary|nonvoluntary)_ctxt_switches:/ { s += $2 } END { print s + 0 }' /proc/"$pid"/task/*/status)"
}

for t in "${TARGETS[@]}"; do
  target_env "$t"
  out="$(env "${conn_env[@]}" "$pg_bin/psql" -X -qtA -c 'SELECT count(*) FROM pgbench_branches' 2>&1)" \
    || die "target $t does not answer: $out"
  [[ "$out" =~ ^[0-9]+$ ]] || die "target $t: unexpected answer: $out"
done
scale="$(env "${conn_env[@]}" "$pg_bin/psql" -X -qtA -c 'SELECT count(*) FROM pgbench_branches')"
target_log_statement="$(PGHOST="$VIGIL_PG_HOST" PGPORT="$VIGIL_PG_PORT" PGSSLMODE=disable PGUSER="$VIGIL_PG_GATEWAY_USER" \
  PGPASSWORD="$VIGIL_PG_GATEWAY_PASSWORD" PGDATABASE=bench "$pg_bin/psql" -X -qtA -c 'SHOW log_statement')"

# run_one ROUND TARGET MODE SECONDS [log]: one pgbench run; appends a line to $results unless warm-up
run_one() {
  local round="$1" t="$2" mode="$3" secs="$4" logged="${5:-}"
  local prefix="$work/runs/$t.$mode.r$round" args=()
  target_env "$t"
  [[ -n "$logged" ]] && args+=(--log "--log-prefix=$work/runs/txlog.$t.$mode.r$round")
  local b_cpu=0 b_audit=0 b_csw=0 a_cpu=0 a_audit=0 a_csw=0
  [[ -n "$proxy_pid" ]] && read -r b_cpu b_audit b_csw < <(proc_sample "$proxy_pid")
  if ! (cd "$work/runs" && env "${conn_env[@]}" "$pg_bin/pgbench" -n -S -M "$mode" -c "$CLIENTS" -j "$THREADS" \
        -T "$secs" "${args[@]}" >"$prefix.out" 2>&1); then
    show_log "$prefix.out"
    [[ "$t" == vigil ]] && show_log "$work/vigil/vigil.log"
    die "pgbench failed against $t ($mode)"
  fi
  [[ -n "$proxy_pid" ]] && read -r a_cpu a_audit a_csw < <(proc_sample "$proxy_pid")
  local tps lat txns failed
  tps="$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time).*/\1/p' "$prefix.out")"
  lat="$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' "$prefix.out")"
  txns="$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$prefix.out")"
  failed="$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$prefix.out")"
  [[ -n "$tps" && -n "$lat" && -n "$txns" ]] || { show_log "$prefix.out"; die "cannot read pgbench's report ($t, $mode)"; }
  [[ -z "$failed" || "$failed" == 0 ]] || { show_log "$prefix.out"; die "$failed failed transactions against $t ($mode)"; }
  if [[ "$round" != w ]]; then
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$t" "$mode" "$tps" "$lat" "$txns" \
      "$((a_cpu - b_cpu))" "$((a_audit - b_audit))" "$((a_csw - b_csw))" >>"$results"
    log "round $round  $(printf '%-12s %-8s' "$t" "$mode") tps $tps  lat avg $lat ms"
  fi
}

load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
total_runs=$((ROUNDS * ${#TARGETS[@]} * ${#MODES[@]}))
log "scale $scale; log_statement on the target: $target_log_statement"
log "$total_runs runs of ${DURATION}s ($ROUNDS rounds x ${#TARGETS[@]} targets x ${#MODES[@]} modes), -c $CLIENTS -j $THREADS; about $(( (total_runs * (DURATION + 1) + ${#TARGETS[@]} * WARMUP) / 60 + 1 )) min"

if ((WARMUP > 0)); then
  for t in "${TARGETS[@]}"; do run_one w "$t" "${MODES[0]}" "$WARMUP"; done
fi
ntargets=${#TARGETS[@]}
for ((r = 1; r <= ROUNDS; r++)); do
  for mode in "${MODES[@]}"; do
    # rotate the order each round so no target always runs first or after the same one
    for ((i = 0; i < ntargets; i++)); do
      run_one "$r" "${TARGETS[(i + r - 1) % ntargets]}" "$mode" "$DURATION" log
    done
  done
done
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------------------- audit log
metric() { awk -v m="$1" '$1 == m { print $2; exit }' "$work/vigil/metrics.txt"; }
audit_rc=0
audit_summary="(vigil not in TARGETS)"
if [[ " ${TARGETS[*]} " == *" vigil "* ]]; then
  curl -fsS -m 5 "http://127.0.0.1:$VIGIL_ADMIN_PORT/metrics" >"$work/vigil/metrics.txt" || : >"$work/vigil/metrics.txt"
  stop_pid "$vigil_pid" vigil-node # a clean stop writes the stream_end record
  vigil_pid=""
  set +e
  "$vigil_cli" audit verify --log "$work/vigil/data/audit" >"$work/vigil/verify.txt" 2>&1
  audit_rc=$?
  set -e
  verify_line="$(grep -E '^(OK|FAILED)' "$work/vigil/verify.txt" | tail -n 1)"
  audit_summary="exit $audit_rc: ${verify_line:-$(tail -n 1 "$work/vigil/verify.txt")}"
  audit_bytes="$(metric vigil_audit_bytes_total)"
  audit_records="$(metric vigil_audit_records_total)"
  audit_batches="$(metric vigil_audit_batches_total)"
  statements="$(metric 'vigil_statements_total{outcome="success"}')"
  audit_files_bytes="$(du -sb "$work/vigil/data/audit" | cut -f1)"
fi

# ---------------------------------------------------------------------------- report
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print ""; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
field() { # target mode column -> values, one per line
  awk -F'\t' -v t="$1" -v m="$2" -v c="$3" '$2 == t && $3 == m { print $c }' "$results"
}
# p50 and p99 (nearest rank) of the per-transaction latencies (µs, 3rd field) of every logged run
percentiles() {
  cat "$work/runs/txlog.$1.$2".r* 2>/dev/null | awk '{ print $3 }' | sort -n \
    | awk '{ v[NR] = $1 } END { if (NR == 0) { print "- -"; exit }
             i50 = int(NR * 0.50); if (i50 < NR * 0.50) i50++; i99 = int(NR * 0.99); if (i99 < NR * 0.99) i99++;
             printf "%.3f %.3f\n", v[i50] / 1000, v[i99] / 1000 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "-"; else printf "%.2f", a / b }'; }
clk_tck="$(getconf CLK_TCK)"

declare -A TPS CPU
table="$work/table.txt"
{
  printf '%-13s %-9s %8s  %-22s %8s %8s %8s %7s %7s %9s %8s %6s\n' \
    target mode "TPS med" "TPS per round" "x direct" "x pgbncr" "lat avg" "p50" "p99" "CPU us/tx" "audit us" "csw/tx"
  for mode in "${MODES[@]}"; do
    for t in "${TARGETS[@]}"; do
      TPS[$t.$mode]="$(field "$t" "$mode" 4 | median)"
    done
    for t in "${TARGETS[@]}"; do
      tps="${TPS[$t.$mode]}"
      rounds="$(awk -F'\t' -v t="$t" -v m="$mode" '$2 == t && $3 == m { printf "%s%.0f", sep, $4; sep = " " }' "$results")"
      lat="$(field "$t" "$mode" 5 | median)"
      read -r p50 p99 < <(percentiles "$t" "$mode")
      cpu="-" audit="-" csw="-"
      if [[ "$t" == vigil* || "$t" == pgbouncer ]]; then
        # CPU (and context switches) over all rounds / transactions over all rounds
        read -r cpu audit csw < <(awk -F'\t' -v t="$t" -v m="$mode" -v hz="$clk_tck" \
          '$2 == t && $3 == m { ticks += $7; at += $8; cs += $9; tx += $6 }
           END { if (tx > 0) printf "%.1f %.1f %.2f\n", ticks * 1e6 / hz / tx, at * 1e6 / hz / tx, cs / tx; else print "- - -" }' "$results")
        CPU[$t.$mode]="$cpu"
        [[ "$t" == vigil* ]] || audit="-"
      fi
      printf '%-13s %-9s %8.0f  %-22s %8s %8s %8.3f %7s %7s %9s %8s %6s\n' "$t" "$mode" "$tps" "$rounds" \
        "$(ratio "$tps" "${TPS[direct-tls.$mode]:-}")" "$(ratio "$tps" "${TPS[pgbouncer.$mode]:-}")" \
        "$lat" "$p50" "$p99" "$cpu" "$audit" "$csw"
    done
  done
} >"$table"

verdict() { # value op goal -> met / NOT met
  awk -v v="$1" -v g="$3" -v op="$2" 'BEGIN { if (v == "-" || v == "") { print "n/a"; exit }
    ok = (op == ">=") ? (v + 0 >= g + 0) : (v + 0 <= g + 0); print ok ? "met" : "NOT met" }'
}

echo
echo "== Vigil pgbench -S: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)), load before $load_before, after $load_after"
echo "   pgbench -n -S -c $CLIENTS -j $THREADS -T $DURATION, $ROUNDS rounds interleaved, scale $scale; medians of the rounds;"
echo "   lat avg = pgbench's average (median of rounds), p50/p99 over every transaction of every round (pgbench --log), in ms;"
echo "   CPU = utime+stime of the proxy process / transactions (audit us: Vigil's vigil-audit thread alone); csw/tx = its context switches per transaction."
echo "   direct-tls, pgbouncer and vigil: client leg TLS (sslmode=require); proxy->PostgreSQL leg plain; target log_statement=$target_log_statement"
echo "   vigil $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')$( [[ -n "$(git -C "$repo" status --porcelain -- node proto 2>/dev/null)" ]] && echo ' + local changes'), audit on (sync=write); $("$pg_bin/postgres" --version); $(/usr/sbin/pgbouncer --version | head -n 1) pool_mode=session"
echo
cat "$table"
echo
if [[ " ${TARGETS[*]} " == *" vigil "* ]]; then
  echo "Goals (reported, not enforced):"
  for mode in "${MODES[@]}"; do
    vd="$(ratio "${TPS[vigil.$mode]}" "${TPS[direct-tls.$mode]:-}")"
    vb="$(ratio "${TPS[vigil.$mode]}" "${TPS[pgbouncer.$mode]:-}")"
    vc="${CPU[vigil.$mode]:--}"
    printf '  %-9s Vigil/direct-tls %5s (>= %s: %s)   Vigil/PgBouncer %5s (>= %s: %s)   gateway CPU %6s us/tx (<= %s: %s)\n' \
      "$mode" "$vd" "$GOAL_VS_DIRECT" "$(verdict "$vd" '>=' "$GOAL_VS_DIRECT")" \
      "$vb" "$GOAL_VS_PGBOUNCER" "$(verdict "$vb" '>=' "$GOAL_VS_PGBOUNCER")" \
      "$vc" "$GOAL_CPU_US" "$(verdict "$vc" '<=' "$GOAL_CPU_US")"
  done
  for mode in "${MODES[@]}"; do
    if [[ -n "${TPS[vigil-guarded.$mode]:-}" ]]; then
      vg="$(ratio "${TPS[vigil-guarded.$mode]}" "${TPS[vigil.$mode]:-}")"
      printf '  %-9s guardrails+masking on / off %5s (>= 0.8: %s)   CPU %s vs %s us/tx\n' "$mode" "$vg" \
        "$(verdict "$vg" '>=' 0.8)" "${CPU[vigil-guarded.$mode]:--}" "${CPU[vigil.$mode]:--}"
    fi
  done
  echo
  echo "Audit log: vigil audit verify $audit_summary"
  awk -v r="${audit_records:-}" -v b="${audit_batches:-}" -v by="${audit_bytes:-}" -v s="${statements:-}" -v f="${audit_files_bytes:-}" 'BEGIN {
    if (r == "" || r == 0) exit
    printf "  metrics: %d statements, %d records in %d group-commit batches (%.1f records/batch), %.0f bytes/record, %.1f MB on disk\n",
      s, r, b, (b > 0 ? r / b : 0), by / r, f / 1e6 }'
fi
[[ "$KEEP_WORKDIR" == 1 ]] && echo "Work dir (kept): $work"

((audit_rc == 0)) || die "the audit log does not verify (see above)"
