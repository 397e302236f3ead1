#!/usr/bin/env bash
# Builds the fuzz targets of node/fuzz (cargo-fuzz, libFuzzer) and runs each one for a while.
# cargo-fuzz needs nightly compiler flags; RUSTC_BOOTSTRAP=1 enables them on the stable
# toolchain this project builds with. New inputs go to a temporary corpus; the seeds in
# node/fuzz/corpus stay as they are. Usage: deploy/dev/fuzz.sh [SECONDS_PER_TARGET]
set -euo pipefail
cd "$(dirname "$0")/../../node"
seconds="${1:-30}"
tools="${VIGIL_TOOLS_DIR:-/var/cache/vigil/tools}"
export PATH="$tools/bin:$PATH"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz into $tools"
  cargo install cargo-fuzz --locked --root "$tools"
fi
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${VIGIL_FUZZ_TARGET_DIR:-/var/cache/vigil/fuzz-target}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Every target is built first: a target that no longer compiles is a failure of its own, not a
# crash found.
if ! cargo fuzz build -O >"$work/build.log" 2>&1; then
  tail -n 60 "$work/build.log"
  echo "fuzz.sh: the fuzz targets do not build (node/fuzz)" >&2
  exit 1
fi
for target in $(cargo fuzz list); do
  mkdir -p "$work/$target"
  echo "fuzz.sh: $target for ${seconds}s"
  if ! cargo fuzz run -O "$target" "$work/$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -max_len=4096 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$work/$target.log" 2>&1; then
    tail -n 60 "$work/$target.log"
    echo "fuzz.sh: $target found a crash (the input is under node/fuzz/artifacts/$target)" >&2
    exit 1
  fi
  grep -E "^stat::(number_of_executed_units|new_units_added)" "$work/$target.log"
done
echo "fuzz.sh: no crash"
