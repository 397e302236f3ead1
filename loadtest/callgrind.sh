#!/usr/bin/env bash
# Instructions the gateway executes per pgbench transaction, counted by valgrind's callgrind:
# the deterministic measure of the PostgreSQL hot path, where wall-clock figures on a shared
# machine are noise. Also the CI guard against a regression (CHECK=1).
#
#   loadtest/callgrind.sh                # both modes, prints instructions per transaction
#   CHECK=1 loadtest/callgrind.sh        # and fails when a mode costs more than the baseline allows
#   ANNOTATE=1 loadtest/callgrind.sh     # and prints the top functions (inclusive) of each mode
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
# Settings (environment):
#   TRANSACTIONS=4000    pgbench -t of the measured run, per mode
#   MODES="simple prepared"
#   CHECK=0              1: compare with BASELINE and exit 1 on a regression
#   BASELINE=loadtest/callgrind.baseline   lines "MODE INSTRUCTIONS_PER_TRANSACTION"
#   TOLERANCE=3          percent above the baseline that still passes
#   ANNOTATE=0           1: callgrind_annotate's top functions per mode
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
[[ "$(id -u)" == 0 ]] || die "run as root (the dev servers run as user postgres)"
command -v valgrind >/dev/null && command -v callgrind_control >/dev/null \
  || die "valgrind not found: run deploy/dev/setup.sh"

work=""
vigil_pid=""
started_servers=0
cleanup() {
  local rc=$?
  set +e
  stop_pid "$vigil_pid" "vigil-node (callgrind)" 60
  finish "$rc"
}
trap_cleanup

ports_free VIGIL_PORT VIGIL_ADMIN_PORT
use_dev_servers postgresql oidc
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
mkdir -p "$work/data"
(umask 077; printf '%s' "$VIGIL_PG_GATEWAY_PASSWORD" >"$work/pg-password")
{
  node_config "$work" callgrind-1 "$VIGIL_ADMIN_PORT"
  printf '[postgres]\nlisten = "127.0.0.1:%s"\n' "$VIGIL_PORT"
  bench_connection bench "$work/pg-password"
} >"$work/vigil.toml"

log "starting vigil-node under callgrind (instrumentation off until it is ready)"
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/callgrind.out.%p" \
  "$vigil_node" --config "$work/vigil.toml" </dev/null >"$work/vigil.log" 2>&1 &
vigil_pid=$!
wait_ready "$vigil_pid" "$VIGIL_ADMIN_PORT" "$VIGIL_PORT" "$work/vigil.log" 120
callgrind_control -i on "$vigil_pid" >/dev/null || die "callgrind_control -i on failed"

# pgbench_run MODE TRANSACTIONS OUT
pgbench_run() {
  fresh_token
  PGPASSWORD="$token" PGSSLMODE=require "$pg_bin/pgbench" -n -S -M "$1" -c 1 -j 1 -t "$2" \
    -h 127.0.0.1 -p "$VIGIL_PORT" -U agent-reporting bench >"$3" 2>&1 \
    || { show_log "$3"; die "pgbench failed ($1)"; }
  pgbench_result "$3" "$1"
}

# measure MODE TRANSACTIONS: zeroes the counters, runs pgbench, dumps them; sets total (the
# instructions of the run) and dump (the file)
measure() {
  local count
  callgrind_control -z "$vigil_pid" >/dev/null || die "callgrind_control -z failed"
  pgbench_run "$1" "$2" "$work/run-$1-$2.txt"
  count="$(find "$work" -maxdepth 1 -name 'callgrind.out.*' | wc -l)"
  callgrind_control -d "$1-$2" "$vigil_pid" >/dev/null || die "callgrind_control -d failed"
  dump=""
  for _ in $(seq 1 300); do
    if (($(find "$work" -maxdepth 1 -name 'callgrind.out.*' | wc -l) > count)); then
      dump="$(ls -t "$work"/callgrind.out.* | head -n 1)"
      grep -q '^totals:' "$dump" && break
    fi
    dump=""
    sleep 0.1
  done
  [[ -n "$dump" ]] || die "no callgrind dump for $1"
  total="$(sed -n 's/^totals: *\([0-9]*\).*/\1/p' "$dump" | head -n 1)"
  [[ -n "$total" ]] || die "no instruction total in $dump"
  sha="$(callgrind_annotate --auto=no --threshold=100 "$dump" 2>/dev/null \
    | awk '/sha2::sha256::(compress256|soft)/ { gsub(",", "", $1); s += $1 } END { print s + 0 }')"
}

# Each pgbench run opens a connection (TLS, token check, the target's SCRAM login: millions of
# instructions), so a mode runs twice, with N and 2N transactions: the difference is N
# transactions and no connection.
declare -A per_tx per_tx_sha per_conn
for mode in "${MODES[@]}"; do
  pgbench_run "$mode" 200 "$work/warmup-$mode.txt"
  measure "$mode" "$TRANSACTIONS"
  once="$total" once_sha="$sha"
  measure "$mode" "$((2 * TRANSACTIONS))"
  twice="$total"
  per_tx[$mode]=$(((twice - once) / TRANSACTIONS))
  per_tx_sha[$mode]=$(((sha - once_sha) / TRANSACTIONS))
  per_conn[$mode]=$((once - TRANSACTIONS * per_tx[$mode]))
  log "$mode: $once instructions for $TRANSACTIONS transactions, $twice for twice as many: ${per_tx[$mode]} per transaction, ${per_conn[$mode]} per connection"
  if [[ "$ANNOTATE" == 1 ]]; then
    echo "== $mode, $((2 * TRANSACTIONS)) transactions: functions by inclusive cost"
    callgrind_annotate --inclusive=yes "$dump" 2>/dev/null | sed -n '/^Ir/,$p' | head -n 60 || true
    echo "== $mode: functions by own cost"
    callgrind_annotate "$dump" 2>/dev/null | sed -n '/file:function/,$p' | head -n 50 || true
  fi
done

commit="$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "== gateway instructions per pgbench -S transaction (callgrind, 1 client, $TRANSACTIONS transactions; $commit)"
# Valgrind hides the CPU's SHA extensions: SHA-256 runs in software here, at many times its
# native cost, so its share is shown apart.
detail() { printf '; of which SHA-256 %d; per connection %d' "${per_tx_sha[$1]}" "${per_conn[$1]}"; }
failed=0
for mode in "${MODES[@]}"; do
  base="$(awk -v m="$mode" '$1 == m { print $2 }' "$BASELINE" 2>/dev/null || true)"
  if [[ -z "$base" ]]; then
    printf '  %-9s %10d   (no baseline)%s\n' "$mode" "${per_tx[$mode]}" "$(detail "$mode")"
    [[ "$CHECK" == 1 ]] && { log "no baseline for $mode in $BASELINE"; failed=1; }
    continue
  fi
  limit=$((base * (100 + TOLERANCE) / 100))
  change="$(awk -v a="${per_tx[$mode]}" -v b="$base" 'BEGIN { printf "%+.1f%%", (a - b) * 100 / b }')"
  state=ok
  ((per_tx[$mode] > limit)) && { state="REGRESSION (limit $limit)"; failed=1; }
  printf '  %-9s %10d   baseline %d (%s): %s%s\n' "$mode" "${per_tx[$mode]}" "$base" "$change" "$state" "$(detail "$mode")"
done
if [[ "$CHECK" == 1 && "$failed" == 1 ]]; then
  die "the hot path costs more instructions than $BASELINE allows (+$TOLERANCE %); a change that is worth it updates the baseline in the same commit, with the reason in loadtest/README.md"
fi
