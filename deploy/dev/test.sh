#!/usr/bin/env bash
# Runs Vigil's test suite against real servers on this machine: installs what is missing,
# starts the dev PostgreSQL, OIDC provider, Kafka-protocol broker (Tansu), OpenSSH server and
# Kubernetes control plane (deploy/dev/servers.sh, which runs deploy/dev/kube.sh), builds the
# binaries, runs every test of the workspace, and stops the servers again. The servers' ports
# come from VIGIL_DEV_*_PORT (see deploy/dev/servers.sh) when the defaults are taken. The local
# cluster's test (chaos/tests/cluster.rs) runs deploy/cluster.sh against these servers itself,
# on free ports and in a directory of its own.
set -euo pipefail
cd "$(dirname "$0")/../.."

deploy/dev/setup.sh
# Fresh servers in a fresh state directory for every run, removed afterwards.
if [[ -z "${VIGIL_DEV_DIR:-}" ]]; then
  VIGIL_DEV_DIR=$(mktemp -d /tmp/vigil-test.XXXXXX)
  chmod 755 "$VIGIL_DEV_DIR"
  rmdir "$VIGIL_DEV_DIR"  # servers.sh creates it (and marks it as its own)
  export VIGIL_DEV_DIR
fi
# A Docker engine for the Compose stack's test (chaos/tests/compose.rs): one that already runs
# is used and left running; one started here is stopped at the end.
engine_was_up=0
if docker info >/dev/null 2>&1; then engine_was_up=1; fi
# Cleanup is armed before the start, so a half-started set of servers is stopped too.
cleanup() {
  local rc=0
  deploy/dev/servers.sh clean || rc=1
  if ((!engine_was_up)); then deploy/compose/engine.sh stop || rc=1; fi
  return "$rc"
}
trap cleanup EXIT
deploy/dev/servers.sh start
deploy/compose/engine.sh start

# The end-to-end tests run the `vigil-node` and `vigil` binaries as child processes.
cargo build --workspace --bins
log=$(mktemp)
status=0
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
# One closing line over every test binary: "N passed, N failed".
summary=$(awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed", p, f }' "$log")
rm -f "$log"
if [[ -n "${VIGIL_TEST_SUMMARY:-}" ]]; then echo "$summary" > "$VIGIL_TEST_SUMMARY"; fi
echo "Tests: $summary"
exit "$status"
