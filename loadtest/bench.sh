#!/usr/bin/env bash
# Benchmarks of the distributed parts, against real processes and the dev servers.
#
#   loadtest/bench.sh coordinator       # approvals on a real 3-member coordinator cluster
#   loadtest/bench.sh audit-pipeline    # audit records through the real Kafka pipeline
#   loadtest/bench.sh console-index     # the console's session index at 100,000 sessions
#
# coordinator: starts MEMBERS `vigil-coordinator` processes (release build, fsync'd redb
#   stores in a temporary directory), forms a cluster, then measures two phases over gRPC:
#   creating approval requests (what gateway nodes do) and deciding them with an approver's
#   OIDC token (what approvers do). Both phases run twice: closed-loop (the capacity), then
#   paced at RATE calls/s in all (the latency at that load, counted from when each call was
#   due). Prints calls/s and p50/p99/max commit latency of acknowledged calls, the goal
#   (>= 5,000 decisions/s; p99 <= 10 ms at 5,000/s, on three members) and what each snapshot
#   cost the members.
#   Settings: MEMBERS=3 CONCURRENCY=64 DURATION=10 RATE=5000 (0: closed loop only)
# audit-pipeline: one node's audit log with the Kafka sink, in process, against the dev
#   broker: ~1 KB records appended by WRITERS tasks until RECORDS are acknowledged (records/s,
#   gateway CPU per record; goals >= 50,000/s and <= 10 us), then SAMPLES records one at a
#   time (append -> broker acknowledgement p50/p99), then the topic is read back and verified.
#   Settings: RECORDS=200000 WRITERS=4 SAMPLES=2000
# console-index: a local audit log of SESSIONS sessions (four records each), taken by an empty
#   index (records/s; goal >= 20,000/s), then the list and the searches an auditor runs, REPEAT
#   times each (median and worst; goal <= 200 ms), then 1,000 more sessions followed. Needs no
#   dev server. Settings: SESSIONS=100000 REPEAT=20
#
# Goals are reported, never enforced. It reuses running dev servers (deploy/dev/servers.sh),
# or starts them and stops them at the end.
# Common settings: VIGIL_DEV_DIR=/tmp/vigil-dev CARGO_TARGET_DIR=/var/cache/vigil/target
#   SKIP_BUILD=1 (use the binaries already built)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
dev_dir="${VIGIL_DEV_DIR:-/tmp/vigil-dev}"
target_dir="${CARGO_TARGET_DIR:-/var/cache/vigil/target}"
log() { printf 'bench.sh: %s\n' "$*" >&2; }
die() { printf 'bench.sh: ERROR: %s\n' "$*" >&2; exit 1; }

case "${1:-}" in
  coordinator) bench=coordinator-bench build=(-p vigil-coordinator-server --bin vigil-coordinator -p vigil-chaos --bin coordinator-bench)
               export MEMBERS="${MEMBERS:-3}" CONCURRENCY="${CONCURRENCY:-64}" DURATION="${DURATION:-10}" RATE="${RATE:-5000}"
               # The members log each snapshot's cost at info; the bench prints those lines.
               export RUST_LOG="${RUST_LOG:-warn,vigil_coordinator::store=info}" ;;
  audit-pipeline) bench=audit-pipeline-bench build=(-p vigil-chaos --bin audit-pipeline-bench)
                  export RECORDS="${RECORDS:-200000}" WRITERS="${WRITERS:-4}" SAMPLES="${SAMPLES:-2000}" ;;
  console-index) bench=console-index-bench build=(-p vigil-chaos --bin console-index-bench) servers=0
                 export SESSIONS="${SESSIONS:-100000}" REPEAT="${REPEAT:-20}" ;;
  *) die "usage: loadtest/bench.sh coordinator|audit-pipeline|console-index" ;;
esac

started_servers=0
cleanup() {
  if ((started_servers)); then
    VIGIL_DEV_DIR="$dev_dir" "$repo/deploy/dev/servers.sh" stop || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

status_out="$(VIGIL_DEV_DIR="$dev_dir" "$repo/deploy/dev/servers.sh" status 2>/dev/null || true)"
if [[ "${servers:-1}" == 0 ]]; then
  :
elif grep -q '^oidc        running' <<<"$status_out" && grep -q '^kafka       running' <<<"$status_out"; then
  log "reusing the dev servers in $dev_dir"
else
  grep -q 'running' <<<"$status_out" &&
    die "some dev servers in $dev_dir run, not all; fix that with deploy/dev/servers.sh start"
  log "starting the dev servers in $dev_dir (stopped again at the end)"
  started_servers=1
  VIGIL_DEV_DIR="$dev_dir" "$repo/deploy/dev/servers.sh" start
fi

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  log "building the release binaries (CARGO_TARGET_DIR=$target_dir)"
  (cd "$repo" && CARGO_TARGET_DIR="$target_dir" cargo build --release -q "${build[@]}")
fi
[[ -x "$target_dir/release/$bench" ]] || die "no $target_dir/release/$bench"

log "machine: $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg)"
VIGIL_DEV_DIR="$dev_dir" "$target_dir/release/$bench"
