#!/usr/bin/env bash
# Instructions the gateway executes per pgbench transaction, counted by valgrind's callgrind:
# the deterministic measure of the PostgreSQL hot path, where wall-clock figures on a shared
# machine are noise. Also the CI guard against a regression (CHECK=1).
#
#   loadtest/callgrind.sh                # both modes, prints instructions per transaction
#   CHECK=1 loadtest/callgrind.sh        # and fails when a mode costs more than the baseline allows
#   ANNOTATE=1 loadtest/callgrind.sh     # and prints the top functions (inclusive) of each mode
#   KAFKA=1 loadtest/callgrind.sh        # and each mode again on a gateway with a Kafka sink (MODE+kafka)
#
# One gateway (release build with symbols: `--profile profiling`) runs under callgrind, with
# instrumentation off until it is ready (start-up and the embedded coordinator's election are
# not counted). Per mode: a warm-up pgbench run (the connection, the classification cache),
# then the counters are zeroed, `pgbench -S -c 1 -t TRANSACTIONS` runs, and the counters are
# dumped. Everything the process executed in that window, on every thread (relay tasks, the
# audit writer, TLS, the runtime, the kernel's share excepted), divided by the transactions, is
# the figure. One client keeps the interleaving of the threads, and so the count, the same run
# after run; callgrind runs the threads one at a time.
#
# KAFKA=1: then a second gateway, the same config plus `[audit.kafka]` to a fresh topic of one
# partition on the dev broker (its local log is the spool), runs the same modes, shown as
# MODE+kafka: the sink's cost is the difference. Its figure includes librdkafka's own threads,
# and each measured run ends only when the broker has acknowledged every record written (the
# stream file's `.acked` cursor at its end), so the shipping of the run's records is in it. The
# producer batches by time (linger.ms) and valgrind runs the gateway some 50 times slower than
# natively, so these figures move more from run to run than the others (a few per cent), and
# time-driven costs (the producer's timers, the shipper's rounds, the cursor file rewritten at
# most every 100 ms) weigh more per transaction than natively: the idle cost per second is shown
# apart. CHECK=1 checks a MODE+kafka row only if the baseline has a line for it.
#
# Settings (environment):
#   TRANSACTIONS=4000    pgbench -t of the measured run, per mode
#   MODES="simple prepared"
#   CHECK=0              1: compare with BASELINE and exit 1 on a regression
#   BASELINE=loadtest/callgrind.baseline   lines "MODE INSTRUCTIONS_PER_TRANSACTION"
#   TOLERANCE=3          percent above the baseline that still passes
#   ANNOTATE=0           1: callgrind_annotate's top functions per mode
#   KAFKA=0              1: the modes again with a Kafka sink (needs the dev broker)
#   VIGIL_PORT=16533 VIGIL_ADMIN_PORT=19288
#   VIGIL_NODE_BIN=PATH  count this vigil-node instead (another commit's, for before and after)
#   VIGIL_DEV_DIR, CARGO_TARGET_DIR, SKIP_BUILD, KEEP_WORKDIR: as in pgbench.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

TRANSACTIONS="${TRANSACTIONS:-4000}"
read -r -a MODES <<<"${MODES:-simple prepared}"
CHECK="${CHECK:-0}"
BASELINE="${BASELINE:-$here/callgrind.baseline}"
TOLERANCE="${TOLERANCE:-3}"
ANNOTATE="${ANNOTATE:-0}"
KAFKA="${KAFKA:-0}"
VIGIL_PORT="${VIGIL_PORT:-16533}"
VIGIL_ADMIN_PORT="${VIGIL_ADMIN_PORT:-19288}"

script=callgrind.sh
# shellcheck source=loadtest/lib.sh
source "$here/lib.sh"

for v in TRANSACTIONS TOLERANCE VIGIL_PORT VIGIL_ADMIN_PORT; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a whole number (got '${!v}')"
done
((TRANSACTIONS > 0)) || die "TRANSACTIONS must be > 0"
for m in "${MODES[@]}"; do
  case "$m" in simple | prepared | extended) ;; *) die "unknown mode '$m'" ;; esac
done
case "$KAFKA" in 0 | 1) ;; *) die "KAFKA must be 0 or 1 (got '$KAFKA')" ;; esac
[[ "$(id -u)" == 0 ]] || die "run as root (the dev servers run as user postgres)"
command -v valgrind >/dev/null && command -v callgrind_control >/dev/null \
  || die "valgrind not found: run deploy/dev/setup.sh"

work=""
vigil_pid=""
topic=""
started_servers=0
cleanup() {
  local rc=$?
  set +e
  stop_pid "$vigil_pid" "vigil-node (callgrind)" 60
  delete_topic "$topic"
  finish "$rc"
}
trap_cleanup

ports_free VIGIL_PORT VIGIL_ADMIN_PORT
if [[ "$KAFKA" == 1 ]]; then
  use_dev_servers postgresql oidc kafka
  [[ -n "${VIGIL_KAFKA_BROKERS:-}" && -n "${VIGIL_KAFKA_URL:-}" && -x "${VIGIL_TANSU:-}" ]] \
    || die "$dev_dir/env has no Kafka broker (VIGIL_KAFKA_*, VIGIL_TANSU): restart the dev servers with this checkout's deploy/dev/servers.sh"
else
  use_dev_servers postgresql oidc
fi
pg_bin="${VIGIL_PG_BIN:-/usr/lib/postgresql/15/bin}"
node_bin="${VIGIL_NODE:-$(command -v node || true)}"
[[ -x "$node_bin" ]] || die "Node.js not found (VIGIL_NODE); run deploy/dev/setup.sh"

if [[ "$SKIP_BUILD" != 1 ]]; then
  log "building the gateway with symbols (cargo build --profile profiling; CARGO_TARGET_DIR=$target_dir)"
  (cd "$repo" && CARGO_TARGET_DIR="$target_dir" cargo build --profile profiling -p vigil-node --bin vigil-node) \
    || die "cargo build failed"
fi
vigil_node="${VIGIL_NODE_BIN:-$target_dir/profiling/vigil-node}"
[[ -x "$vigil_node" ]] || die "$vigil_node missing (build first, or unset SKIP_BUILD)"

work="$(mktemp -d /tmp/vigil-callgrind.XXXXXX)"
chmod 755 "$work"
(umask 077; printf '%s' "$VIGIL_PG_GATEWAY_PASSWORD" >"$work/pg-password")

# pgbench_run MODE TRANSACTIONS OUT
pgbench_run() {
  fresh_token
  PGPASSWORD="$token" PGSSLMODE=require "$pg_bin/pgbench" -n -S -M "$1" -c 1 -j 1 -t "$2" \
    -h 127.0.0.1 -p "$VIGIL_PORT" -U agent-reporting bench >"$3" 2>&1 \
    || { show_log "$3"; die "pgbench failed ($1)"; }
  pgbench_result "$3" "$1"
}

# shipped DIR: waits (up to 120 s) until the broker has acknowledged the whole stream file in
# DIR/data/audit: its `.acked` cursor (rewritten at most every 100 ms) at the file's size, twice
# 0.3 s apart (the session's end is written just after pgbench exits).
shipped() {
  local f n=0 size acked
  f="$(ls "$1"/data/audit/*.jsonl 2>/dev/null | head -n 1)"
  [[ -n "$f" ]] || die "no stream file in $1/data/audit"
  for _ in $(seq 1 400); do
    size="$(stat -c %s "$f")"
    acked="$(cut -d' ' -f1 "$f.acked" 2>/dev/null || true)"
    if [[ "$acked" == "$size" ]]; then
      n=$((n + 1))
      ((n >= 2)) && return 0
    else
      n=0
    fi
    sleep 0.3
  done
  show_log "$1/vigil.log"
  die "the broker did not acknowledge the stream within 120 s ($acked of $size bytes)"
}

# dump NAME DIR: dumps the counters; sets total (the instructions since they were zeroed) and
# dump (the file)
dump() {
  local count
  count="$(find "$2" -maxdepth 1 -name 'callgrind.out.*' | wc -l)"
  callgrind_control -d "$1" "$vigil_pid" >/dev/null || die "callgrind_control -d failed"
  dump=""
  for _ in $(seq 1 300); do
    if (($(find "$2" -maxdepth 1 -name 'callgrind.out.*' | wc -l) > count)); then
      dump="$(ls -t "$2"/callgrind.out.* | head -n 1)"
      grep -q '^totals:' "$dump" && break
    fi
    dump=""
    sleep 0.1
  done
  [[ -n "$dump" ]] || die "no callgrind dump for $1"
  total="$(sed -n 's/^totals: *\([0-9]*\).*/\1/p' "$dump" | head -n 1)"
  [[ -n "$total" ]] || die "no instruction total in $dump"
}

# measure MODE TRANSACTIONS DIR: zeroes the counters, runs pgbench (and with a Kafka sink waits
# until the broker has acknowledged everything), dumps them; sets total, dump and sha (the
# software SHA-256's share)
measure() {
  callgrind_control -z "$vigil_pid" >/dev/null || die "callgrind_control -z failed"
  pgbench_run "$1" "$2" "$3/run-$1-$2.txt"
  [[ "$(basename "$3")" == kafka ]] && shipped "$3"
  dump "$1-$2" "$3"
  sha="$(callgrind_annotate --auto=no --threshold=100 "$dump" 2>/dev/null \
    | awk '/sha2::sha256::(compress256|soft)/ { gsub(",", "", $1); s += $1 } END { print s + 0 }')"
}

# Each pgbench run opens a connection (TLS, token check, the target's SCRAM login: millions of
# instructions), so a mode runs twice, with N and 2N transactions: the difference is N
# transactions and no connection.
declare -A per_tx per_tx_sha per_conn idle
rows=()
# gateway SINK: starts vigil-node under callgrind in $work/SINK, with (kafka) or without (local)
# a Kafka sink, measures every mode on it (rows MODE, or MODE+kafka) and its idle cost, stops it
gateway() {
  local sink="$1" dir="$work/$1" mode row once once_sha twice suffix=""
  [[ "$sink" == kafka ]] && suffix=+kafka
  mkdir -p "$dir/data"
  chmod 755 "$dir"
  {
    node_config "$dir" "callgrind-$sink" "$VIGIL_ADMIN_PORT"
    printf '[postgres]\nlisten = "127.0.0.1:%s"\n' "$VIGIL_PORT"
    bench_connection bench "$work/pg-password"
    if [[ "$sink" == kafka ]]; then
      create_topic vigil-callgrind "$dir/topic.log"
      kafka_config "$topic"
    fi
  } >"$dir/vigil.toml"

  log "starting vigil-node ($sink) under callgrind (instrumentation off until it is ready)"
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$dir/callgrind.out.%p" \
    "$vigil_node" --config "$dir/vigil.toml" </dev/null >"$dir/vigil.log" 2>&1 &
  vigil_pid=$!
  wait_ready "$vigil_pid" "$VIGIL_ADMIN_PORT" "$VIGIL_PORT" "$dir/vigil.log" 120
  callgrind_control -i on "$vigil_pid" >/dev/null || die "callgrind_control -i on failed"

  for mode in "${MODES[@]}"; do
    row="$mode$suffix"
    rows+=("$row")
    pgbench_run "$mode" 200 "$dir/warmup-$mode.txt"
    [[ "$sink" == kafka ]] && shipped "$dir"
    measure "$mode" "$TRANSACTIONS" "$dir"
    once="$total" once_sha="$sha"
    measure "$mode" "$((2 * TRANSACTIONS))" "$dir"
    twice="$total"
    per_tx[$row]=$(((twice - once) / TRANSACTIONS))
    per_tx_sha[$row]=$(((sha - once_sha) / TRANSACTIONS))
    per_conn[$row]=$((once - TRANSACTIONS * per_tx[$row]))
    log "$row: $once instructions for $TRANSACTIONS transactions, $twice for twice as many: ${per_tx[$row]} per transaction, ${per_conn[$row]} per connection"
    if [[ "$ANNOTATE" == 1 ]]; then
      echo "== $row, $((2 * TRANSACTIONS)) transactions: functions by inclusive cost"
      callgrind_annotate --inclusive=yes "$dump" 2>/dev/null | sed -n '/^Ir/,$p' | head -n 60 || true
      echo "== $row: functions by own cost"
      callgrind_annotate "$dump" 2>/dev/null | sed -n '/file:function/,$p' | head -n 50 || true
    fi
  done
  if [[ "$KAFKA" == 1 ]]; then
    # What the gateway executes doing nothing (timers: the witness, the producer's threads).
    callgrind_control -z "$vigil_pid" >/dev/null || die "callgrind_control -z failed"
    sleep 10
    dump idle "$dir"
    idle[$sink]=$((total / 10))
    log "$sink: ${idle[$sink]} instructions per second idle"
  fi
  stop_pid "$vigil_pid" "vigil-node ($sink, callgrind)" 60
  vigil_pid=""
}

gateway local
[[ "$KAFKA" == 1 ]] && gateway kafka

commit="$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "== gateway instructions per pgbench -S transaction (callgrind, 1 client, $TRANSACTIONS transactions; $commit)"
# Valgrind hides the CPU's SHA extensions: SHA-256 runs in software here, at many times its
# native cost, so its share is shown apart.
detail() { printf '; of which SHA-256 %d; per connection %d' "${per_tx_sha[$1]}" "${per_conn[$1]}"; }
failed=0
for mode in "${rows[@]}"; do
  base="$(awk -v m="$mode" '$1 == m { print $2 }' "$BASELINE" 2>/dev/null || true)"
  if [[ -z "$base" ]]; then
    printf '  %-14s %10d   (no baseline)%s\n' "$mode" "${per_tx[$mode]}" "$(detail "$mode")"
    # The +kafka rows are informational unless the baseline names them (see KAFKA above).
    [[ "$CHECK" == 1 && "$mode" != *+kafka ]] && { log "no baseline for $mode in $BASELINE"; failed=1; }
    continue
  fi
  limit=$((base * (100 + TOLERANCE) / 100))
  change="$(awk -v a="${per_tx[$mode]}" -v b="$base" 'BEGIN { printf "%+.1f%%", (a - b) * 100 / b }')"
  state=ok
  ((per_tx[$mode] > limit)) && { state="REGRESSION (limit $limit)"; failed=1; }
  printf '  %-14s %10d   baseline %d (%s): %s%s\n' "$mode" "${per_tx[$mode]}" "$base" "$change" "$state" "$(detail "$mode")"
done
if [[ "$KAFKA" == 1 ]]; then
  for mode in "${MODES[@]}"; do
    awk -v m="$mode" -v on="${per_tx[$mode+kafka]}" -v off="${per_tx[$mode]}" 'BEGIN {
      printf "  %-14s Kafka sink: %+d per transaction (%+.1f%%)\n", m, on - off, (on - off) * 100 / off }'
  done
  printf '  idle, per second: %d without the sink, %d with it\n' "${idle[local]}" "${idle[kafka]}"
fi
if [[ "$CHECK" == 1 && "$failed" == 1 ]]; then
  die "the hot path costs more instructions than $BASELINE allows (+$TOLERANCE %); a change that is worth it updates the baseline in the same commit, with the reason in loadtest/README.md"
fi
