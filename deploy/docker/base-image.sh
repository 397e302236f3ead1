#!/usr/bin/env bash
# Makes the local image debian:bookworm-slim from Debian's packages, for Docker engines that
# cannot pull from a container registry (every Dockerfile under deploy/ starts FROM it).
#
#   deploy/docker/base-image.sh [--force]
#
# A no-op when the engine already has debian:bookworm-slim (pulled or made here), unless
# --force. Otherwise `debootstrap --variant=minbase bookworm` into a temporary tree (about
# 50 s and 200 MB, run as root), packed once into $VIGIL_BASE_IMAGE_TAR (default
# /var/cache/vigil/docker/debian-bookworm-minbase.tar, outside any clone so later runs and
# other clones on the machine reuse it), then `docker import`ed. The tree is made to look like
# the official slim image where it matters to a Dockerfile: apt sources for bookworm,
# bookworm-updates and bookworm-security, no package lists or .debs left behind, no
# recommended packages installed by default. Delete the tar file to make a fresh one.
#   VIGIL_DEBIAN_MIRROR   the mirror debootstrap fetches from (default http://deb.debian.org/debian)
set -euo pipefail

image=debian:bookworm-slim
tar_file="${VIGIL_BASE_IMAGE_TAR:-/var/cache/vigil/docker/debian-bookworm-minbase.tar}"
mirror="${VIGIL_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

log() { printf 'base-image.sh: %s\n' "$*" >&2; }
die() { printf 'base-image.sh: ERROR: %s\n' "$*" >&2; exit 1; }

force=0
case "${1:-}" in
  --force) force=1 ;;
  "") ;;
  *) die "usage: $0 [--force]" ;;
esac

docker info >/dev/null 2>&1 || die "the Docker engine does not answer (start it: deploy/compose/engine.sh start)"

if ((!force)) && docker image inspect "$image" >/dev/null 2>&1; then
  log "$image is already there"
  exit 0
fi

if [[ ! -s "$tar_file" ]]; then
  [[ "$(id -u)" == 0 ]] || die "run as root (debootstrap)"
  command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap; deploy/dev/setup.sh installs it)"
  mkdir -p "$(dirname "$tar_file")"
  tree="$(mktemp -d /var/tmp/vigil-rootfs.XXXXXX)"
  trap 'rm -rf -- "$tree" "$tar_file.tmp"' EXIT
  log "debootstrap --variant=minbase bookworm $tree (about 50 s)"
  debootstrap --variant=minbase bookworm "$tree" "$mirror" >"$tree.log" 2>&1 \
    || { tail -20 "$tree.log" >&2; rm -f "$tree.log"; die "debootstrap failed"; }
  rm -f "$tree.log"
  rm -f "$tree/etc/apt/sources.list"
  cat >"$tree/etc/apt/sources.list.d/debian.sources" <<SOURCES
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
    >"$tree/etc/apt/apt.conf.d/99vigil-no-recommends"
  rm -rf "$tree"/var/lib/apt/lists/* "$tree"/var/cache/apt/archives/*.deb "$tree"/var/log/*.log
  # the build host's name and resolver do not belong in an image
  : >"$tree/etc/hostname"
  rm -f "$tree/etc/resolv.conf"
  tar --numeric-owner -C "$tree" -cf "$tar_file.tmp" .
  mv -f "$tar_file.tmp" "$tar_file"
  rm -rf -- "$tree"
  trap - EXIT
  log "packed $tar_file ($(du -h "$tar_file" | cut -f1))"
fi

log "docker import $tar_file as $image"
docker import --change 'CMD ["bash"]' --change 'ENV LANG=C.UTF-8' "$tar_file" "$image" >/dev/null \
  || die "docker import failed"
log "$image ready"
