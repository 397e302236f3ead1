#!/usr/bin/env bash
# Runs Vigil's test suite against real servers on this machine: installs what is missing,
# starts the dev PostgreSQL and OIDC provider, builds the binaries, runs every test of the
# workspace, and stops the servers again.
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
deploy/dev/servers.sh start
trap 'deploy/dev/servers.sh clean' EXIT

# The end-to-end tests run the `vigil-node` and `vigil` binaries as child processes.
cargo build --workspace --bins
cargo test --workspace "$@"
