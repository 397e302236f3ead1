#!/usr/bin/env bash
# Approval throughput and commit latency of a real coordinator cluster.
#
#   loadtest/coordinator.sh                 # 3 members, 64 callers, 10 s per phase
#   MEMBERS=5 CONCURRENCY=128 DURATION=20 loadtest/coordinator.sh
#
# Starts MEMBERS `vigil-coordinator` processes (release build, fsync'd redb stores in a
# temporary directory), forms a cluster, then measures two phases over gRPC: creating approval
# requests (what gateway nodes do) and deciding them with an approver's OIDC token (what
# approvers do). Prints calls/s and p50/p99/max commit latency of acknowledged calls, and the
# issue's goal (>= 5,000 decisions/s, p99 <= 10 ms on three members). The goal is reported,
# never enforced. It needs the dev OIDC provider (deploy/dev/servers.sh): it reuses running
# dev servers, or starts them and stops them at the end.
#
# Settings (environment): MEMBERS=3 CONCURRENCY=64 DURATION=10
#   VIGIL_DEV_DIR=/tmp/vigil-dev  CARGO_TARGET_DIR=/var/cache/vigil/target  SKIP_BUILD=1
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
dev_dir="${VIGIL_DEV_DIR:-/tmp/vigil-dev}"
target_dir="${CARGO_TARGET_DIR:-/var/cache/vigil/target}"
export MEMBERS="${MEMBERS:-3}" CONCURRENCY="${CONCURRENCY:-64}" DURATION="${DURATION:-10}"

log() { printf 'coordinator.sh: %s\n' "$*" >&2; }
die() { printf 'coordinator.sh: ERROR: %s\n' "$*" >&2; exit 1; }

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
if grep -q '^oidc        running' <<<"$status_out"; then
  log "reusing the dev servers in $dev_dir"
else
  grep -q 'running' <<<"$status_out" &&
    die "some dev servers in $dev_dir run, the OIDC provider does not; fix that with deploy/dev/servers.sh start"
  log "starting the dev servers in $dev_dir (stopped again at the end)"
  started_servers=1
  VIGIL_DEV_DIR="$dev_dir" "$repo/deploy/dev/servers.sh" start
fi

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  log "building the release binaries (CARGO_TARGET_DIR=$target_dir)"
  (cd "$repo" && CARGO_TARGET_DIR="$target_dir" cargo build --release -q \
    -p vigil-node --bin vigil-coordinator -p vigil-chaos --bin coordinator-bench)
fi
[[ -x "$target_dir/release/coordinator-bench" ]] || die "no $target_dir/release/coordinator-bench"

log "machine: $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg)"
VIGIL_DEV_DIR="$dev_dir" "$target_dir/release/coordinator-bench"
