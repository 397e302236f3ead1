#!/usr/bin/env bash
# Builds the Vigil image from binaries built on the host (Dockerfile.prebuilt): for machines
# whose Docker engine cannot pull a Rust image (or any image: deploy/docker/base-image.sh makes
# debian:bookworm-slim from Debian's packages first when it is missing).
#
#   deploy/docker/build.sh [--bins DIR] [--tag TAG]
#
#   --bins DIR  where vigil-node, vigil-coordinator and vigil are (default
#               ${CARGO_TARGET_DIR:-target}/release: run `cargo build --release --bins` first).
#               Debug builds work too (the tests use them); debug info is stripped either way.
#   --tag TAG   the image's name (default vigil:latest, what deploy/compose uses)
# Builds with --network host, so apt inside the build works without Docker's NAT.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

log() { printf 'build.sh: %s\n' "$*" >&2; }
die() { printf 'build.sh: ERROR: %s\n' "$*" >&2; exit 1; }

bins="${CARGO_TARGET_DIR:-$root/target}/release"
tag=vigil:latest
while (($#)); do
  case "$1" in
    --bins) bins="${2:?--bins DIR}"; shift 2 ;;
    --tag) tag="${2:?--tag TAG}"; shift 2 ;;
    *) die "usage: $0 [--bins DIR] [--tag TAG]" ;;
  esac
done

for b in vigil-node vigil-coordinator vigil; do
  [[ -x "$bins/$b" ]] || die "$bins/$b not found: build it first (cargo build --release --bins) or give --bins DIR"
done
command -v strip >/dev/null || die "strip not found (package binutils)"
"$here/base-image.sh"

ctx="$(mktemp -d /var/tmp/vigil-image.XXXXXX)"
trap 'rm -rf -- "$ctx"' EXIT
mkdir "$ctx/bin"
for b in vigil-node vigil-coordinator vigil; do
  strip --strip-debug -o "$ctx/bin/$b" "$bins/$b"
done
cp "$here/vigil-entrypoint" "$here/vigil-cluster-init" "$ctx/bin/"
cp "$here/Dockerfile.prebuilt" "$ctx/Dockerfile"
log "building $tag from $bins"
old="$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)"
docker build --network host -q -t "$tag" "$ctx" >/dev/null || die "docker build failed"
# the image the tag named before, if nothing else names it now (no pile of untagged images)
if [[ -n "$old" && "$old" != "$(docker image inspect -f '{{.Id}}' "$tag")" \
      && "$(docker image inspect -f '{{len .RepoTags}}' "$old" 2>/dev/null)" == 0 ]]; then
  docker rmi "$old" >/dev/null 2>&1 || true
fi
log "$tag ready ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%d MB", $1/1e6}'))"
