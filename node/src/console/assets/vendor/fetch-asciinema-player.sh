#!/usr/bin/env bash
# Fetches the asciinema-player release the console embeds (node/src/console/assets/vendor/):
# its prebuilt bundle and stylesheet and its licence, from the npm registry, checked against
# the registry's integrity digest. Run it to update VERSION; commit what it writes. Vigil's
# build never runs it (no Node.js needed to build or run Vigil).
set -euo pipefail
VERSION="${VERSION:-3.18.0}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack --silent "asciinema-player@$VERSION" >/dev/null
tarball="asciinema-player-$VERSION.tgz"
want="$(npm view "asciinema-player@$VERSION" dist.integrity)"
got="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
[[ "$want" == "$got" ]] || { echo "integrity mismatch: registry $want, tarball $got" >&2; exit 1; }
tar xzf "$tarball"
cp package/dist/bundle/asciinema-player.min.js "$here/asciinema-player.min.js"
cp package/dist/bundle/asciinema-player.css "$here/asciinema-player.css"
cp package/LICENSE "$here/asciinema-player.LICENSE"
printf 'asciinema-player %s (npm, %s)\n' "$VERSION" "$want" > "$here/asciinema-player.VERSION"
echo "asciinema-player $VERSION vendored in $here"
