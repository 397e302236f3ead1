#!/usr/bin/env bash
# Side-by-side pgbench: direct PostgreSQL, PgBouncer and the Vigil gateway (audit on), also with
# its audit stream published to Kafka.
#
#   loadtest/pgbench.sh            # defaults: 3 rounds x 10 s per target and mode
#   DURATION=5 ROUNDS=2 loadtest/pgbench.sh
#
# Run as root on the dev machine (see loadtest/README.md). It reuses the dev servers of
# deploy/dev/servers.sh when they run, otherwise starts them and stops them at the end; it
# builds the release gateway, starts it and a PgBouncer in a temporary directory (and, for the
# target vigil-kafka, a second gateway whose audit log is the spool of a Kafka sink, on a fresh
# topic of the dev broker), runs `pgbench -S` (select-only, held connections) interleaved over
# the targets, prints a table and checks the gateway's audit log (and the Kafka node's topic)
# with `vigil audit verify`. Everything it started is stopped on exit. It reports only: the
# goals never change the exit status; a failed audit verification or a failed pgbench run does
# (exit 1).
#
# Settings (environment):
#   DURATION=10          seconds per pgbench run
#   ROUNDS=3             interleaved rounds; the table shows the median per target and mode
#   CLIENTS=8 THREADS=2  pgbench -c / -j
#   WARMUP=3             seconds of unlogged warm-up per target before round 1 (0: none)
#   MODES="simple prepared"
#   TARGETS="direct-plain direct-tls pgbouncer vigil vigil-kafka vigil-guarded"
#   VIGIL_PORT=16433 VIGIL_ADMIN_PORT=19188 PGBOUNCER_PORT=16434   (127.0.0.1)
#   VIGIL_KAFKA_NODE_PORT=16435 VIGIL_KAFKA_ADMIN_PORT=19189      the Kafka node's (vigil-kafka)
#   VIGIL_DEV_DIR=/tmp/vigil-dev   dev servers' state dir (servers.sh)
#   CARGO_TARGET_DIR=/var/cache/vigil/target   SKIP_BUILD=1 uses the binaries already there
#   BUILD_PROFILE=release  the cargo profile built and run (`profiling`: the same code with
#                        symbols, for perf)
#   VIGIL_NODE_BIN=PATH  run this vigil-node instead (a build of another commit, for a before and
#                        after comparison)
#   KEEP_WORKDIR=1       keep the temporary directory (logs, pgbench logs, audit log) and the topic
#   AUDIT_SYNC=write     the gateways' audit.sync: write, or fsync (every batch synced before
#                        its requests are forwarded)
#   KAFKA_EXTRA=         more lines for the Kafka node's [audit.kafka] section, as in
#                        KAFKA_EXTRA='compression = "lz4"'
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

DURATION="${DURATION:-10}"
ROUNDS="${ROUNDS:-3}"
CLIENTS="${CLIENTS:-8}"
THREADS="${THREADS:-2}"
WARMUP="${WARMUP:-3}"
read -r -a MODES <<<"${MODES:-simple prepared}"
read -r -a TARGETS <<<"${TARGETS:-direct-plain direct-tls pgbouncer vigil vigil-kafka vigil-guarded}"
VIGIL_PORT="${VIGIL_PORT:-16433}"
VIGIL_ADMIN_PORT="${VIGIL_ADMIN_PORT:-19188}"
PGBOUNCER_PORT="${PGBOUNCER_PORT:-16434}"
VIGIL_KAFKA_NODE_PORT="${VIGIL_KAFKA_NODE_PORT:-16435}"
VIGIL_KAFKA_ADMIN_PORT="${VIGIL_KAFKA_ADMIN_PORT:-19189}"

# The issue's goals (reported, never enforced).
GOAL_VS_DIRECT=0.75
GOAL_VS_PGBOUNCER=1.0
GOAL_CPU_US=25
GOAL_KAFKA_VS_LOCAL=0.9

script=pgbench.sh
# shellcheck source=loadtest/lib.sh
source "$here/lib.sh" # the common settings (dev_dir, target_dir, SKIP_BUILD, KEEP_WORKDIR, AUDIT_SYNC); log, die, stop_pid, ratio …

for v in DURATION ROUNDS CLIENTS THREADS WARMUP VIGIL_PORT VIGIL_ADMIN_PORT PGBOUNCER_PORT \
         VIGIL_KAFKA_NODE_PORT VIGIL_KAFKA_ADMIN_PORT; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a whole number (got '${!v}')"
done
((DURATION > 0 && ROUNDS > 0 && CLIENTS > 0 && THREADS > 0)) || die "DURATION, ROUNDS, CLIENTS, THREADS must be > 0"
for t in "${TARGETS[@]}"; do
  case "$t" in direct-plain | direct-tls | pgbouncer | vigil | vigil-kafka | vigil-guarded) ;; *) die "unknown target '$t'" ;; esac
done
with_kafka=0
[[ " ${TARGETS[*]} " == *" vigil-kafka "* ]] && with_kafka=1
for m in "${MODES[@]}"; do
  case "$m" in simple | prepared | extended) ;; *) die "unknown mode '$m'" ;; esac
done
[[ "$(id -u)" == 0 ]] || die "run as root (the dev servers and PgBouncer run as user postgres)"

# ---------------------------------------------------------------------------- cleanup
work=""
vigil_pid=""
vigil_kafka_pid=""
bouncer_pid=""
topic=""
started_servers=0

cleanup() {
  local rc=$?
  set +e
  stop_pid "$vigil_pid" vigil-node
  stop_pid "$vigil_kafka_pid" "vigil-node (Kafka)"
  stop_pid "$bouncer_pid" pgbouncer
  delete_topic "$topic"
  finish "$rc"
}
trap_cleanup

# ---------------------------------------------------------------------------- prerequisites
pg_bin=/usr/lib/postgresql/15/bin
if [[ ! -x "$pg_bin/pgbench" || ! -x /usr/sbin/pgbouncer || ! -d "$repo/deploy/dev/oidc/node_modules/oidc-provider" ]]; then
  log "prerequisites missing: running deploy/dev/setup.sh"
  "$repo/deploy/dev/setup.sh"
fi

ports=(VIGIL_PORT VIGIL_ADMIN_PORT PGBOUNCER_PORT)
((with_kafka)) && ports+=(VIGIL_KAFKA_NODE_PORT VIGIL_KAFKA_ADMIN_PORT)
ports_free "${ports[@]}"

# ---------------------------------------------------------------------------- dev servers
status_out="$(VIGIL_DEV_DIR="$dev_dir" "$repo/deploy/dev/servers.sh" status 2>/dev/null || true)"
pg_up=0 oidc_up=0 kafka_up=0
grep -q '^postgresql  running' <<<"$status_out" && pg_up=1
grep -q '^oidc        running' <<<"$status_out" && oidc_up=1
grep -q '^kafka       running' <<<"$status_out" && kafka_up=1
if ((with_kafka)); then
  grep -q '^kafka       paused' <<<"$status_out" && die "the dev Kafka broker is paused: $(grep '^kafka' <<<"$status_out")"
else
  kafka_up=$((pg_up && oidc_up)) # only the target vigil-kafka needs the broker
fi
if ((pg_up && oidc_up && kafka_up)); then
  log "reusing the dev servers in $dev_dir"
elif ((!pg_up && !oidc_up && !kafka_up)); then
  log "starting the dev servers in $dev_dir (stopped again at the end)"
  started_servers=1
  VIGIL_DEV_DIR="$dev_dir" "$repo/deploy/dev/servers.sh" start
else
  die "only some of the dev servers in $dev_dir run; fix that with deploy/dev/servers.sh start (they are not ours to stop), or use another VIGIL_DEV_DIR and ports"
fi
# This also provisions the bench database when servers run but it is missing (idempotent).
[[ -f "$dev_dir/env" ]] || VIGIL_DEV_DIR="$dev_dir" "$repo/deploy/dev/servers.sh" start
# shellcheck disable=SC1091
source "$dev_dir/env"
pg_bin="${VIGIL_PG_BIN:-$pg_bin}"
node_bin="${VIGIL_NODE:-$(command -v node || true)}"
[[ -x "$node_bin" ]] || die "Node.js not found (VIGIL_NODE); run deploy/dev/setup.sh"
if ((with_kafka)); then
  [[ -n "${VIGIL_KAFKA_BROKERS:-}" && -n "${VIGIL_KAFKA_URL:-}" && -x "${VIGIL_TANSU:-}" ]] \
    || die "$dev_dir/env has no Kafka broker (VIGIL_KAFKA_*, VIGIL_TANSU): restart the dev servers with this checkout's deploy/dev/servers.sh"
fi

# ---------------------------------------------------------------------------- build
if [[ "$SKIP_BUILD" != 1 ]]; then
  log "building the gateway (profile $BUILD_PROFILE, CARGO_TARGET_DIR=$target_dir; may wait for another build's lock)"
  (cd "$repo" && CARGO_TARGET_DIR="$target_dir" cargo build --profile "$BUILD_PROFILE" -p vigil-node -p vigil-cli --bins) \
    || die "cargo build failed"
fi
vigil_node="${VIGIL_NODE_BIN:-$target_dir/$BUILD_PROFILE/vigil-node}"
vigil_cli="$target_dir/$BUILD_PROFILE/vigil"
[[ -x "$vigil_node" && -x "$vigil_cli" ]] || die "$vigil_node or $vigil_cli missing (build first, or unset SKIP_BUILD)"

# ---------------------------------------------------------------------------- work dir
# Disk: each Vigil target writes its audit log (~2 records of ~850 bytes per transaction, at up
# to ~25k transactions/s here) and the target logs every statement. Refuse to start rather than
# fill the disk halfway through (the dev servers and the build cache share it).
vigil_targets=0
for t in "${TARGETS[@]}"; do [[ "$t" == vigil* ]] && vigil_targets=$((vigil_targets + 1)); done
need_mb=$(( (DURATION * ROUNDS * ${#MODES[@]} * (vigil_targets * 45 + ${#TARGETS[@]} * 6)) + 2048 ))
free_mb="$(df -Pm /tmp | awk 'NR == 2 { print $4 }')"
((free_mb >= need_mb)) || die "about ${need_mb} MB of disk needed in /tmp (audit logs, the target's statement log), ${free_mb} MB free; free some, or lower DURATION/ROUNDS/TARGETS"

work="$(mktemp -d /tmp/vigil-pgbench.XXXXXX)"
chmod 755 "$work"
mkdir -p "$work/runs" "$work/vigil/data"
results="$work/results.tsv" # round target mode tps lat_avg_ms txns cpu_ticks audit_ticks ctx_switches
: >"$results"

# ---------------------------------------------------------------------------- Vigil
(umask 077; printf '%s' "$VIGIL_PG_GATEWAY_PASSWORD" >"$work/vigil/pg-password")
# vigil_config ID DIR PORT ADMIN_PORT: a node's config file on stdout. Every node runs an
# embedded coordinator; its gRPC port is picked free, so two nodes do not collide on 7470.
vigil_config() {
  node_config "$2" "$1" "$4" "max_result_bytes = 65536"
  printf '[postgres]\nlisten = "127.0.0.1:%s"\n' "$3"
  bench_connection bench "$work/vigil/pg-password"
  # The same database behind guardrails and masking (target vigil-guarded), in the same process.
  bench_connection bench_guarded "$work/vigil/pg-password"
  cat <<EOF

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
}

# start_vigil NAME DIR PORT ADMIN_PORT PIDVAR: starts vigil-node on DIR/vigil.toml, sets PIDVAR
# (at once, so the cleanup trap stops it) and waits until it is ready
start_vigil() {
  local name="$1" dir="$2" port="$3" admin="$4" pid
  log "starting $name on 127.0.0.1:$port (admin $admin)"
  "$vigil_node" --config "$dir/vigil.toml" </dev/null >"$dir/vigil.log" 2>&1 &
  pid=$!
  printf -v "$5" '%s' "$pid"
  wait_ready "$pid" "$admin" "$port" "$dir/vigil.log" 15
}

vigil_config bench-1 "$work/vigil" "$VIGIL_PORT" "$VIGIL_ADMIN_PORT" >"$work/vigil/vigil.toml"
start_vigil vigil-node "$work/vigil" "$VIGIL_PORT" "$VIGIL_ADMIN_PORT" vigil_pid

# The same gateway with a Kafka sink (target vigil-kafka): its local log is the spool, shipped
# to a topic of its own on the dev broker by an idempotent producer.
if ((with_kafka)); then
  mkdir -p "$work/vigil-kafka/data"
  create_topic vigil-pgbench "$work/vigil-kafka/topic.log" # from here on the cleanup trap deletes it
  {
    vigil_config bench-2 "$work/vigil-kafka" "$VIGIL_KAFKA_NODE_PORT" "$VIGIL_KAFKA_ADMIN_PORT"
    kafka_config "$topic"
  } >"$work/vigil-kafka/vigil.toml"
  start_vigil "vigil-node (Kafka, topic $topic)" "$work/vigil-kafka" "$VIGIL_KAFKA_NODE_PORT" "$VIGIL_KAFKA_ADMIN_PORT" vigil_kafka_pid
fi

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
    vigil-kafka) fresh_token
           conn_env=(PGHOST=127.0.0.1 PGPORT="$VIGIL_KAFKA_NODE_PORT" PGSSLMODE=require
                     PGUSER=bench-agent PGPASSWORD="$token")
           proxy_pid="$vigil_kafka_pid" ;;
  esac
  local db=bench
  [[ "$1" == vigil-guarded ]] && db=bench_guarded
  conn_env+=(PGDATABASE="$db" PGCONNECT_TIMEOUT=10)
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
    [[ "$t" == vigil-kafka ]] && show_log "$work/vigil-kafka/vigil.log"
    die "pgbench failed against $t ($mode)"
  fi
  [[ -n "$proxy_pid" ]] && read -r a_cpu a_audit a_csw < <(proc_sample "$proxy_pid")
  local tps lat txns spool=""
  # the Kafka node's backlog right after the run: records written but not yet acknowledged
  if [[ "$t" == vigil-kafka ]]; then
    spool="$(curl -fsS -m 2 "http://127.0.0.1:$VIGIL_KAFKA_ADMIN_PORT/metrics" 2>/dev/null \
      | awk '$1 == "vigil_audit_spool_records" { print $2; exit }' || true)"
    spool_max="$(awk -v a="${spool:-0}" -v b="$spool_max" 'BEGIN { print (a + 0 > b + 0) ? a + 0 : b + 0 }')"
  fi
  pgbench_result "$prefix.out" "$t, $mode"
  if [[ "$round" != w ]]; then
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$t" "$mode" "$tps" "$lat" "$txns" \
      "$((a_cpu - b_cpu))" "$((a_audit - b_audit))" "$((a_csw - b_csw))" >>"$results"
    log "round $round  $(printf '%-12s %-8s' "$t" "$mode") tps $tps  lat avg $lat ms${spool:+  spool $spool records}"
  fi
}

spool_max=0 # the largest backlog of the Kafka node seen right after a run
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
metric() { awk -v m="$1" '$1 == m { print $2; exit }' "${2:-$work/vigil/metrics.txt}"; } # name [file]
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
  verify_line="$(grep -E '^(OK|FAILED)' "$work/vigil/verify.txt" | tail -n 1 || true)"
  audit_summary="exit $audit_rc: ${verify_line:-$(tail -n 1 "$work/vigil/verify.txt")}"
  audit_bytes="$(metric vigil_audit_bytes_total)"
  audit_records="$(metric vigil_audit_records_total)"
  audit_batches="$(metric vigil_audit_batches_total)"
  statements="$(metric 'vigil_statements_total{outcome="success"}')"
  audit_files_bytes="$(du -sb "$work/vigil/data/audit" | cut -f1)"
fi

# ---------------------------------------------------------------------------- Kafka topic
kafka_rc=0
kafka_summary="(vigil-kafka not in TARGETS)"
if ((with_kafka)); then
  kmetrics="$work/vigil-kafka/metrics.txt"
  curl -fsS -m 5 "http://127.0.0.1:$VIGIL_KAFKA_ADMIN_PORT/metrics" >"$kmetrics" || : >"$kmetrics"
  # A clean stop writes the stream_end record and ships the rest of the spool (the node waits
  # up to 10 s for the broker's acknowledgements), so the topic ends like the local log.
  stop_pid "$vigil_kafka_pid" "vigil-node (Kafka)" 60
  vigil_kafka_pid=""
  verify_topic "$topic" "$work/vigil-kafka/verify.txt" "$work/vigil-kafka/data/audit"
fi

# ---------------------------------------------------------------------------- report
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


echo
echo "== Vigil pgbench -S: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)), load before $load_before, after $load_after"
echo "   pgbench -n -S -c $CLIENTS -j $THREADS -T $DURATION, $ROUNDS rounds interleaved, scale $scale; medians of the rounds;"
echo "   lat avg = pgbench's average (median of rounds), p50/p99 over every transaction of every round (pgbench --log), in ms;"
echo "   CPU = utime+stime of the proxy process / transactions (audit us: Vigil's vigil-audit thread alone); csw/tx = its context switches per transaction."
echo "   direct-tls, pgbouncer and vigil: client leg TLS (sslmode=require); proxy->PostgreSQL leg plain; target log_statement=$target_log_statement"
echo "   vigil $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')$( [[ -n "$(git -C "$repo" status --porcelain -- node proto 2>/dev/null)" ]] && echo ' + local changes'), audit on (sync=$AUDIT_SYNC); $("$pg_bin/postgres" --version); $(/usr/sbin/pgbouncer --version | head -n 1) pool_mode=session"
((with_kafka)) && echo "   vigil-kafka: a second node, the same config plus [audit.kafka] (the local log is the spool) to $("$VIGIL_TANSU" --version | head -n 1), memory-only, topic $topic (1 partition)"
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
  for mode in "${MODES[@]}"; do
    if [[ -n "${TPS[vigil-kafka.$mode]:-}" ]]; then
      vk="$(ratio "${TPS[vigil-kafka.$mode]}" "${TPS[vigil.$mode]:-}")"
      printf '  %-9s Kafka sink on / local log only: %s (goal >= %s: %s)   CPU %s vs %s us/tx\n' "$mode" "$vk" \
        "$GOAL_KAFKA_VS_LOCAL" "$(verdict "$vk" '>=' "$GOAL_KAFKA_VS_LOCAL")" "${CPU[vigil-kafka.$mode]:--}" "${CPU[vigil.$mode]:--}"
    fi
  done
  echo
  echo "Audit log: vigil audit verify $audit_summary"
  awk -v r="${audit_records:-}" -v b="${audit_batches:-}" -v by="${audit_bytes:-}" -v s="${statements:-}" -v f="${audit_files_bytes:-}" 'BEGIN {
    if (r == "" || r == 0) exit
    printf "  metrics: %d statements, %d records in %d group-commit batches (%.1f records/batch), %.0f bytes/record, %.1f MB on disk\n",
      s, r, b, (b > 0 ? r / b : 0), by / r, f / 1e6 }'
fi
if ((with_kafka)); then
  echo
  echo "Kafka topic $topic: vigil audit verify --kafka $kafka_summary"
  [[ -n "$kafka_streams" ]] && printf '%s\n' "$kafka_streams"
  awk -v v="${kafka_verified:-0}" -v l="$kafka_local" -v s="$(metric vigil_audit_spool_records "$kmetrics")" -v m="$spool_max" \
      -v a="$(metric vigil_kafka_acked_records_total "$kmetrics")" -v e="$(metric vigil_kafka_delivery_errors_total "$kmetrics")" 'BEGIN {
    printf "  %d of the %d records of the Kafka node'"'"'s local log verified on the topic; spool after the runs: %s records (largest after a run: %d), %s acknowledged, %s delivery errors\n",
      v, l, (s == "" ? "?" : s), m, (a == "" ? "?" : a), (e == "" ? "?" : e) }'
fi
[[ "$KEEP_WORKDIR" == 1 ]] && echo "Work dir (kept): $work"

((audit_rc == 0)) || die "the audit log does not verify (see above)"
((kafka_rc == 0)) || die "the Kafka topic does not verify, or does not hold the whole stream (see above)"
