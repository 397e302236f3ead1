#!/usr/bin/env bash
# Runs Vigil's test suite against real servers on this machine: installs what is missing,
# starts the dev PostgreSQL and OIDC provider, builds the binaries, runs every test of the
# workspace, and stops the servers again.
set -euo pipefail
cd "$(dirname "$0")/../.."

deploy/dev/setup.sh
deploy/dev/servers.sh start
trap 'deploy/dev/servers.sh stop' EXIT

# The end-to-end tests run the `vigil-node` and `vigil` binaries as child processes.
cargo build --workspace --bins
cargo test --workspace "$@"
