#!/usr/bin/env bash
# A real Kubernetes API server for Vigil's Kubernetes-gateway tests: etcd, kube-apiserver and
# kube-controller-manager 1.20.2 (built from Debian 12's kubernetes source package), and a
# test-only kubelet (deploy/dev/kube/kubelet) that serves exec/attach/port-forward for one pod.
#
#   deploy/dev/kube.sh install|start|stop|status|clean|prune
#
#   install  (root) apt packages, then builds kube-apiserver, kube-controller-manager and
#            vigil-test-kubelet from Debian's kubernetes source (about 8 minutes and 1.5 GB of
#            RAM cold; the tree and Go's build cache stay in $VIGIL_KUBE_BUILD_DIR, about 2 GB)
#            and installs them into $VIGIL_KUBE_BIN, each with a stamp file ($VIGIL_KUBE_BIN/NAME.stamp:
#            the Kubernetes version and build recipe, and for the test kubelet the sha256 of its
#            source). Only the binaries whose stamp is not the expected one are built: a changed
#            kube/kubelet/*.go rebuilds the test kubelet alone (a few minutes when the tree must be
#            fetched again, seconds with the kept build cache). A no-op (well under a second)
#            when every stamp is current.
#   prune    deletes $VIGIL_KUBE_BUILD_DIR (the source tree and Go's build cache): the installed
#            binaries do not need it; the next install that must build fetches it again.
#   start    starts what is not running, (re)applies the dev RBAC, the Node and the Pod, waits
#            until ready and writes $VIGIL_DEV_DIR/kube/env (`export NAME=value` lines).
#            Idempotent: running servers are left alone. About 14 s the first time (PKI, empty
#            etcd), 7-8 s after a stop, 2 s when all runs.
#   stop     stops them by PID (safe when nothing runs); the cluster's state (etcd) is kept.
#   status   one line per server; exit 3 when one is not running.
#   clean    stop, then delete $VIGIL_DEV_DIR/kube (only if kube.sh created it).
#
#   VIGIL_DEV_DIR              state dir (default /tmp/vigil-dev); everything here is in $VIGIL_DEV_DIR/kube
#   VIGIL_DEV_KUBE_PORT        kube-apiserver, https://127.0.0.1:PORT (default 25443)
#   VIGIL_DEV_ETCD_PORT        etcd clients, http://127.0.0.1:PORT (default 25379)
#   VIGIL_DEV_ETCD_PEER_PORT   etcd peers, 127.0.0.1 (default 25380)
#   VIGIL_DEV_KUBELET_PORT     the test kubelet, https://127.0.0.1:PORT (default 25250)
#   VIGIL_DEV_KUBE_EXEC_USER   run exec'd commands as this user (default: the user running
#                              kube.sh, i.e. root; needs root to switch)
#   VIGIL_KUBE_BIN             installed binaries (default /var/cache/vigil/kube/bin)
#   VIGIL_KUBE_BUILD_DIR       source tree, build cache, private apt state (default /var/cache/vigil/kube-build)
#
# What runs (all on 127.0.0.1, each with a PID file and a log in $VIGIL_DEV_DIR/kube):
#   - etcd 3.4 (Debian's etcd-server), data in $VIGIL_DEV_DIR/kube/etcd;
#   - kube-apiserver: its own PKI (pki/, made with openssl), a static token file with three
#     users: vigil-admin (group system:masters; admin.token, admin.kubeconfig), vigil-gateway
#     (no group, no rights but impersonation: gateway.token, gateway.kubeconfig; the
#     ClusterRole+Binding vigil-dev-gateway-impersonate, kube/gateway-impersonate.yaml) and
#     system:kube-controller-manager; authorization Node,RBAC; the audit log audit.log
#     (JSON, every request at level Metadata, kube/audit-policy.yaml): the ground truth of who
#     asked, as whom ("user", "impersonatedUser"), for what (rotated at 1 GB, one old file
#     kept; an idle cluster writes about 3 KB/s to it);
#   - kube-controller-manager: service accounts and their tokens, namespace deletion, garbage
#     collection... (every default controller but the node lifecycle one, which would mark the
#     test node NotReady and evict its pod: no real kubelet posts its status);
#   - vigil-test-kubelet, registered as Node vigil-dev-node with the Pod default/shell
#     (container "shell") bound to it and patched to Running: exec/attach on that pod run on
#     this host (see kube/kubelet/main.go), port-forward reaches 127.0.0.1:PORT here, and each
#     one is logged as a JSON line in kubelet-exec.log: the ground truth of what ran. The
#     container's log (pods/log) is the file container.log: `kubectl logs -f` follows it, so a
#     test appends a line and sees it arrive; each log request is a JSON line in kubelet-exec.log
#     too, written when it ends, with the bytes it sent.
# kube-apiserver 1.20 knows no Impersonate-Uid header (from 1.22 on). kubectl 1.30+'s WebSocket
# exec and attach (v5.channel.k8s.io) work: the test kubelet serves v5 itself.
# Deleting the pod needs --force --grace-period=0 (no kubelet confirms the deletion).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
kube_src_dir="$here/kube"

dev_dir="${VIGIL_DEV_DIR:-/tmp/vigil-dev}"
kube_port="${VIGIL_DEV_KUBE_PORT:-25443}"
etcd_port="${VIGIL_DEV_ETCD_PORT:-25379}"
etcd_peer_port="${VIGIL_DEV_ETCD_PEER_PORT:-25380}"
kubelet_port="${VIGIL_DEV_KUBELET_PORT:-25250}"
exec_user="${VIGIL_DEV_KUBE_EXEC_USER:-}"
kube_bin="${VIGIL_KUBE_BIN:-/var/cache/vigil/kube/bin}"
build_dir="${VIGIL_KUBE_BUILD_DIR:-/var/cache/vigil/kube-build}"

# ---- what install builds
deb_kube_version="1.20.5+really1.20.2-1.1+deb12u1"  # Debian 12's kubernetes source package
kube_version="v1.20.2"                              # what it really is
# bump when the build recipe changes, so `install` rebuilds on machines that have old binaries
build_recipe=1
binaries=(kube-apiserver kube-controller-manager vigil-test-kubelet)
# before the per-binary stamps ($kube_bin/NAME.stamp): one stamp for all three
old_stamp_file="$kube_bin/VERSION"
runtime_pkgs=(etcd-server openssl curl ca-certificates)
build_pkgs=(golang-go golang-github-modern-go-reflect2-dev rsync build-essential dpkg-dev xz-utils)

# ---- state
kube_dir="$dev_dir/kube"
pki="$kube_dir/pki"
marker="$kube_dir/.vigil-dev-kube"
etcd_data="$kube_dir/etcd"
shell_home="$kube_dir/shell-home"
ca_crt="$kube_dir/ca.crt"
tokens_csv="$pki/tokens.csv"
admin_token_file="$kube_dir/admin.token"
gateway_token_file="$kube_dir/gateway.token"
kcm_token_file="$pki/controller-manager.token"
admin_kubeconfig="$kube_dir/admin.kubeconfig"
gateway_kubeconfig="$kube_dir/gateway.kubeconfig"
kcm_kubeconfig="$pki/controller-manager.kubeconfig"
audit_log="$kube_dir/audit.log"
exec_log="$kube_dir/kubelet-exec.log"
container_log="$kube_dir/container.log"
env_file="$kube_dir/env"

admin_user=vigil-admin
gateway_user=vigil-gateway
gateway_cert_user=vigil-gateway-cert
node_name=vigil-dev-node
pod_namespace=default
pod_name=shell
container_name=shell

log() { printf 'kube.sh: %s\n' "$*" >&2; }
die() { printf 'kube.sh: ERROR: %s\n' "$*" >&2; exit 1; }

show_log() { # file [lines]
  if [[ -f "$1" ]]; then
    printf -- '----- last lines of %s -----\n' "$1" >&2
    tail -n "${2:-40}" "$1" >&2 || true
    printf -- '----- end of %s -----\n' "$1" >&2
  fi
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

apt_updated=0
apt_install() { # packages... (only the missing ones)
  local missing=() pkg
  for pkg in "$@"; do installed "$pkg" || missing+=("$pkg"); done
  ((${#missing[@]})) || return 0
  log "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ((!apt_updated)); then
    apt-get update -qq >&2 || die "apt-get update failed"
    apt_updated=1
  fi
  # (etcd-server's own service, on systemd machines, listens on 2379: not used here)
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
}

# ============================================================================ install
server_stamp() {
  printf 'kubernetes %s (debian source %s), build recipe %s' "$kube_version" "$deb_kube_version" "$build_recipe"
}

# what the stamp of binary NAME must say: the test kubelet's also names its source
expected_stamp() { # name
  if [[ "$1" == vigil-test-kubelet ]]; then
    local kubelet_sum
    kubelet_sum="$(cat "$kube_src_dir"/kubelet/*.go | sha256sum | cut -d' ' -f1)"
    printf '%s, test kubelet source sha256 %s\n' "$(server_stamp)" "$kubelet_sum"
  else
    printf '%s\n' "$(server_stamp)"
  fi
}

installed_stamp() { # name
  if [[ -f "$kube_bin/$1.stamp" ]]; then
    cat "$kube_bin/$1.stamp"
  elif [[ -f "$old_stamp_file" ]]; then
    # the one stamp of an older install: the servers' part of it, or all of it for the kubelet
    local old
    old="$(cat "$old_stamp_file")"
    if [[ "$1" == vigil-test-kubelet ]]; then printf '%s\n' "$old"; else printf '%s\n' "${old%%, test kubelet source sha256 *}"; fi
  fi
}

binary_current() { # name
  [[ -x "$kube_bin/$1" && "$(installed_stamp "$1")" == "$(expected_stamp "$1")" ]]
}

# the binaries whose stamp is not the expected one
stale_binaries() {
  local b
  for b in "${binaries[@]}"; do binary_current "$b" || printf '%s\n' "$b"; done
}

# The private apt state: a deb-src list of its own, so the system's apt configuration, lists and
# caches stay untouched.
apt_src() { # apt-get args...
  local a="$build_dir/apt"
  apt-get -o Dir::Etc::SourceList="$a/sources.list" -o Dir::Etc::SourceParts="$a/sources.list.d" \
    -o Dir::State::Lists="$a/lists" -o Dir::Cache="$a/cache" -o APT::Sandbox::User=root "$@"
}

fetch_source() { # prints the tree's path
  local src="$build_dir/src" tree
  tree="$(find "$src" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' 2>/dev/null | head -n1)"
  if [[ -n "$tree" && -f "$tree/.vigil-source-complete" ]]; then
    printf '%s\n' "$tree"
    return 0
  fi
  local a="$build_dir/apt"
  rm -rf "$src" "$a"
  mkdir -p "$src" "$a/sources.list.d" "$a/lists/partial" "$a/cache/archives/partial"
  cat >"$a/sources.list" <<'EOF'
deb-src http://deb.debian.org/debian bookworm main
deb-src http://deb.debian.org/debian bookworm-updates main
deb-src http://deb.debian.org/debian-security bookworm-security main
EOF
  log "fetching Debian's kubernetes source package ($deb_kube_version)"
  apt_src -q update >"$build_dir/apt-update.log" 2>&1 \
    || { show_log "$build_dir/apt-update.log"; die "apt-get update (deb-src, private state in $a) failed"; }
  if ! (cd "$src" && apt_src -q source --only-source "kubernetes=$deb_kube_version") >"$build_dir/apt-source.log" 2>&1; then
    # a later Debian update of the same 1.20 package replaces this version on the mirror
    log "version $deb_kube_version is not on the mirror any more; taking the one there is"
    rm -rf "$src" && mkdir -p "$src"
    (cd "$src" && apt_src -q source --only-source kubernetes) >"$build_dir/apt-source.log" 2>&1 \
      || { show_log "$build_dir/apt-source.log"; die "apt-get source kubernetes failed"; }
  fi
  tree="$(find "$src" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)"
  [[ -n "$tree" && -f "$tree/Makefile" && -d "$tree/vendor" ]] \
    || { show_log "$build_dir/apt-source.log"; die "no kubernetes source tree with vendor/ in $src"; }
  # the unpacked tree is all that is needed
  rm -f "$src"/*.orig.tar.* "$src"/*.debian.tar.* "$src"/*.dsc
  touch "$tree/.vigil-source-complete"
  printf '%s\n' "$tree"
}

cmd_install() {
  [[ "$(id -u)" == 0 ]] || die "install runs as root (apt packages)"
  command -v apt-get >/dev/null || die "apt-get not found: this script targets Debian 12"
  apt_install "${runtime_pkgs[@]}"
  # kubectl: the machine's own if any (e.g. 1.32), else Debian's, the same 1.20 as the server
  command -v kubectl >/dev/null || apt_install kubernetes-client

  local stale=()
  mapfile -t stale < <(stale_binaries)
  if ((!${#stale[@]})); then
    log "kube binaries already installed in $kube_bin ($(server_stamp))"
    return 0
  fi

  local started=$SECONDS
  apt_install "${build_pkgs[@]}"
  mkdir -p "$build_dir"
  local avail_kb
  avail_kb="$(df -Pk "$build_dir" | awk 'NR==2 {print $4}')"
  ((avail_kb > 5 * 1024 * 1024)) || die "the build needs about 5 GB free in $build_dir (has $((avail_kb / 1024)) MB)"

  local tree
  tree="$(fetch_source)"
  log "building in $tree"

  # Mandatory: the vendored reflect2 1.0.1 reads Go runtime internals that changed in Go 1.18;
  # with Debian's Go 1.19 the apiserver then dies with "fatal error: fault". Debian's packaged
  # reflect2 (1.0.2) is fixed.
  local r2=/usr/share/gocode/src/github.com/modern-go/reflect2
  [[ -f "$r2/go_above_118.go" ]] || die "$r2 lacks go_above_118.go (package golang-github-modern-go-reflect2-dev too old?)"
  if ! cmp -s "$r2/go_above_118.go" "$tree/vendor/github.com/modern-go/reflect2/go_above_118.go"; then
    log "replacing vendor/github.com/modern-go/reflect2 with Debian's $(dpkg-query -W -f='${Version}' golang-github-modern-go-reflect2-dev)"
    rm -rf "$tree/vendor/github.com/modern-go/reflect2"
    cp -rL "$r2" "$tree/vendor/github.com/modern-go/reflect2"
  fi

  # the test kubelet is built as a command of the tree (GOPATH mode: k8s.io/kubernetes/... and
  # everything in vendor/ resolve as for the real kubelet)
  rm -rf "$tree/cmd/vigil-test-kubelet"
  mkdir -p "$tree/cmd/vigil-test-kubelet"
  cp "$kube_src_dir"/kubelet/*.go "$tree/cmd/vigil-test-kubelet/"

  local what="${stale[*]/#/cmd/}"
  log "make WHAT='$what' (kube-apiserver: about 8 minutes cold, 1-2 with the kept build cache; log $build_dir/build.log)"
  # GOPATH mode (the tree's own hack/ scripts set GOPATH to _output/local/go), static binaries
  # as Debian builds them; HOME for Go's own settings
  if ! (cd "$tree" && env GO111MODULE=off CGO_ENABLED=0 HOME="$build_dir" GOFLAGS= \
        make WHAT="$what") >"$build_dir/build.log" 2>&1; then
    show_log "$build_dir/build.log" 60
    die "the kubernetes build failed"
  fi

  local out="$tree/_output/local/bin/linux/amd64" b
  mkdir -p "$kube_bin"
  for b in "${stale[@]}"; do
    [[ -x "$out/$b" ]] || die "the build made no $out/$b"
    install -m 755 "$out/$b" "$kube_bin/$b.new"
    mv -f "$kube_bin/$b.new" "$kube_bin/$b"
  done
  "$kube_bin/kube-apiserver" --version | grep -qF "Kubernetes $kube_version" \
    || die "$kube_bin/kube-apiserver --version does not say $kube_version"
  # every binary gets its own stamp (those not rebuilt keep what the old one said of them)
  local stamp
  for b in "${binaries[@]}"; do
    if [[ " ${stale[*]} " == *" $b "* ]]; then
      stamp="$(expected_stamp "$b")"
    else
      stamp="$(installed_stamp "$b")"
    fi
    printf '%s\n' "$stamp" >"$kube_bin/$b.stamp.new"
    mv -f "$kube_bin/$b.stamp.new" "$kube_bin/$b.stamp"
  done
  rm -f "$old_stamp_file"

  # the binaries are installed: drop the build's own binaries (about 270 MB), keep the source
  # tree and Go's build cache (_output/local/go/cache) so a changed test kubelet rebuilds in
  # seconds
  rm -rf "$tree/_output/local/bin" "$tree/_output/bin"
  log "installed ${stale[*]} into $kube_bin in $((SECONDS - started)) s ('$0 prune' deletes the build tree, $(du -sh "$build_dir" 2>/dev/null | cut -f1))"
}

cmd_prune() {
  [[ -d "$build_dir" ]] || { log "no build tree in $build_dir"; return 0; }
  log "removing $build_dir ($(du -sh "$build_dir" | cut -f1))"
  rm -rf -- "$build_dir"
}

# ============================================================================ helpers
resolve_kubectl() {
  command -v kubectl >/dev/null || die "kubectl not found: run '$0 install' first"
  command -v kubectl
}

# alive = exists and is not a zombie
proc_alive() {
  local state
  state="$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null)" || return 1
  [[ -n "$state" && "$state" != Z && "$state" != X ]]
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pidfile() { printf '%s/%s.pid\n' "$kube_dir" "$1"; }
logfile() { printf '%s/%s.log\n' "$kube_dir" "$1"; }
portfile() { printf '%s/%s.port\n' "$kube_dir" "$1"; }

svc_pid() { [[ -f "$(pidfile "$1")" ]] && cat "$(pidfile "$1")"; }

# alive = the process in the PID file runs the binary NAME with our state dir on its command line
svc_alive() { # name binary
  local pid
  pid="$(svc_pid "$1" 2>/dev/null)" || return 1
  [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
  proc_alive "$pid" || return 1
  local cmdline
  cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline")"
  [[ "$cmdline" == *"$2"* && "$cmdline" == *"$kube_dir/"* ]]
}

svc_port() { # name default
  if [[ -f "$(portfile "$1")" ]]; then cat "$(portfile "$1")"; else printf '%s\n' "$2"; fi
}

spawn() { # name command...: in its own session, stdin from /dev/null, log appended
  local name="$1"; shift
  setsid "$@" </dev/null >>"$(logfile "$name")" 2>&1 &
  printf '%s\n' "$!" >"$(pidfile "$name")"
}

wait_ready() { # name pid seconds check-command...
  local name="$1" pid="$2" secs="$3"; shift 3
  local deadline=$((SECONDS + secs))
  while ((SECONDS < deadline)); do
    proc_alive "$pid" || return 1
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  return 1
}

svc_stop() { # name binary
  if svc_alive "$1" "$2"; then
    local pid _
    pid="$(svc_pid "$1")"
    log "stopping $1 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do proc_alive "$pid" || break; sleep 0.1; done
    if proc_alive "$pid"; then
      log "$1 did not exit on SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do proc_alive "$pid" || break; sleep 0.1; done
    fi
  else
    log "$1 not running"
  fi
  rm -f "$(pidfile "$1")" "$(portfile "$1")"
}

start_failed() { # name pid message
  kill -TERM "$2" 2>/dev/null || true
  rm -f "$(pidfile "$1")" "$(portfile "$1")"
  show_log "$(logfile "$1")"
  die "$3"
}

# ============================================================================ PKI and tokens
openssl_q() { openssl "$@" >>"$pki/openssl.log" 2>&1 || { show_log "$pki/openssl.log"; die "openssl $1 failed"; }; }

leaf_cert() { # name subject extensions
  openssl_q req -new -newkey rsa:2048 -nodes -subj "$2" -keyout "$pki/$1.key" -out "$pki/$1.csr"
  printf '%s\n' "$3" >"$pki/$1.ext"
  openssl_q x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days 3650 -extfile "$pki/$1.ext" -out "$pki/$1.crt"
  rm -f "$pki/$1.csr" "$pki/$1.ext"
}

make_pki() {
  if [[ -f "$pki/.complete" ]]; then return 0; fi
  log "generating the cluster's PKI in $pki"
  rm -rf "$pki"
  install -d -m 700 "$pki"
  (
    umask 077
    openssl_q req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=vigil-dev-kube-ca" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -keyout "$pki/ca.key" -out "$pki/ca.crt"
    # the apiserver's serving certificate: 127.0.0.1/localhost, and the in-cluster names
    leaf_cert apiserver "/CN=kube-apiserver" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.96.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    # the apiserver's client certificate towards the kubelet (--kubelet-client-certificate)
    leaf_cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
    # the test kubelet's serving certificate (the apiserver checks it: --kubelet-certificate-authority)
    leaf_cert kubelet "/CN=$node_name" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:$node_name"
    # service-account token signing key
    openssl_q genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$pki/sa.key"
    openssl_q pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub"
  )
  chmod 644 "$pki/ca.crt"
  rm -f "$pki/openssl.log"
  touch "$pki/.complete"
}

# The gateway's other kind of credential: a client certificate (user vigil-gateway-cert, the
# same impersonation grant). Made apart from make_pki so that a PKI made before it gains it.
make_gateway_client_cert() {
  [[ -s "$pki/gateway-client.crt" && -s "$pki/gateway-client.key" ]] && return 0
  (
    umask 077
    leaf_cert gateway-client "/CN=$gateway_cert_user" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
  )
  rm -f "$pki/openssl.log"
}

make_tokens() {
  local f
  for f in "$admin_token_file" "$gateway_token_file" "$kcm_token_file"; do
    [[ -s "$f" ]] || (umask 077; openssl rand -hex 32 >"$f.tmp" && mv "$f.tmp" "$f")
  done
  # token,user,uid,"groups"
  (umask 077
   {
     printf '%s,%s,%s,"system:masters"\n' "$(cat "$admin_token_file")" "$admin_user" "$admin_user"
     printf '%s,%s,%s\n' "$(cat "$gateway_token_file")" "$gateway_user" "$gateway_user"
     printf '%s,system:kube-controller-manager,system:kube-controller-manager\n' "$(cat "$kcm_token_file")"
   } >"$tokens_csv.tmp")
  mv -f "$tokens_csv.tmp" "$tokens_csv"
  install -m 644 "$pki/ca.crt" "$ca_crt"
}

write_kubeconfig() { # file user token-file
  local ca_b64
  ca_b64="$(base64 -w0 <"$pki/ca.crt")"
  (umask 077
   cat >"$1.tmp" <<EOF
# Written by deploy/dev/kube.sh start
apiVersion: v1
kind: Config
clusters:
- name: vigil-dev
  cluster:
    server: https://127.0.0.1:$kube_port
    certificate-authority-data: $ca_b64
users:
- name: $2
  user:
    token: $(cat "$3")
contexts:
- name: vigil-dev
  context:
    cluster: vigil-dev
    user: $2
    namespace: default
current-context: vigil-dev
EOF
  )
  mv -f "$1.tmp" "$1"
}

# ============================================================================ etcd
etcd_ready() { curl -fsS -m 2 "http://127.0.0.1:$(svc_port etcd "$etcd_port")/health" | grep -q '"health":"true"'; }

etcd_start() {
  if svc_alive etcd /usr/bin/etcd; then
    local _
    for _ in $(seq 1 50); do etcd_ready && break; sleep 0.1; done
    etcd_ready || { show_log "$(logfile etcd)"; die "etcd (pid $(svc_pid etcd)) runs but is not healthy"; }
    log "etcd already running (pid $(svc_pid etcd), port $(svc_port etcd "$etcd_port"))"
    return 0
  fi
  rm -f "$(pidfile etcd)" "$(portfile etcd)"
  [[ -x /usr/bin/etcd ]] || die "/usr/bin/etcd not found: run '$0 install' first"
  port_open "$etcd_port" && die "port $etcd_port on 127.0.0.1 is in use; choose another with VIGIL_DEV_ETCD_PORT"
  port_open "$etcd_peer_port" && die "port $etcd_peer_port on 127.0.0.1 is in use; choose another with VIGIL_DEV_ETCD_PEER_PORT"

  log "starting etcd on 127.0.0.1:$etcd_port"
  install -d -m 700 "$etcd_data"
  spawn etcd /usr/bin/etcd --name vigil-dev --data-dir "$etcd_data" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster "vigil-dev=http://127.0.0.1:$etcd_peer_port" --initial-cluster-state new \
    --initial-cluster-token vigil-dev-kube --logger zap --log-level warn \
    --quota-backend-bytes 4294967296 --auto-compaction-retention 1h
  printf '%s\n' "$etcd_port" >"$(portfile etcd)"
  local pid
  pid="$(svc_pid etcd)"
  wait_ready etcd "$pid" 30 etcd_ready || start_failed etcd "$pid" "etcd failed to start on port $etcd_port"
  log "etcd ready (pid $pid)"
}

# ============================================================================ kube-apiserver
kubectl_admin() { "$kubectl" --kubeconfig "$admin_kubeconfig" --request-timeout 10s "$@"; }

apiserver_ready() { [[ "$(kubectl_admin get --raw /readyz 2>/dev/null)" == ok ]]; }

apiserver_start() {
  local bin="$kube_bin/kube-apiserver"
  if svc_alive apiserver "$bin"; then
    local _
    for _ in $(seq 1 50); do apiserver_ready && break; sleep 0.2; done
    apiserver_ready || { show_log "$(logfile apiserver)"; die "kube-apiserver (pid $(svc_pid apiserver)) runs but /readyz is not ok"; }
    log "kube-apiserver already running (pid $(svc_pid apiserver), port $(svc_port apiserver "$kube_port"))"
    return 0
  fi
  rm -f "$(pidfile apiserver)" "$(portfile apiserver)"
  port_open "$kube_port" && die "port $kube_port on 127.0.0.1 is in use; choose another with VIGIL_DEV_KUBE_PORT"

  log "starting kube-apiserver on https://127.0.0.1:$kube_port"
  # --kubelet-preferred-address-types=InternalIP: the node's InternalIP is 127.0.0.1 (its
  # Hostname does not resolve). --endpoint-reconciler-type=none: the "kubernetes" Service's
  # endpoints would be 127.0.0.1, which Endpoints validation refuses.
  spawn apiserver "$bin" \
    --bind-address 127.0.0.1 --secure-port "$kube_port" --advertise-address 127.0.0.1 --insecure-port 0 \
    --etcd-servers "http://127.0.0.1:$etcd_port" --etcd-prefix /registry \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" \
    --token-auth-file "$tokens_csv" \
    --authorization-mode Node,RBAC \
    --enable-admission-plugins NodeRestriction \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --api-audiences https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range 10.96.0.0/16 --endpoint-reconciler-type none \
    --kubelet-certificate-authority "$pki/ca.crt" \
    --kubelet-client-certificate "$pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$pki/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types InternalIP \
    --audit-policy-file "$kube_src_dir/audit-policy.yaml" \
    --audit-log-path "$audit_log" --audit-log-format json \
    --audit-log-maxsize 1024 --audit-log-maxbackup 1 --audit-log-mode blocking \
    --allow-privileged=true --profiling=false --v 1
  printf '%s\n' "$kube_port" >"$(portfile apiserver)"
  local pid
  pid="$(svc_pid apiserver)"
  wait_ready apiserver "$pid" 90 apiserver_ready \
    || start_failed apiserver "$pid" "kube-apiserver failed to start on port $kube_port (or /readyz never said ok)"
  log "kube-apiserver ready (pid $pid)"
}

# ============================================================================ controller manager
kcm_start() {
  local bin="$kube_bin/kube-controller-manager"
  if svc_alive controller-manager "$bin"; then
    log "kube-controller-manager already running (pid $(svc_pid controller-manager))"
    return 0
  fi
  rm -f "$(pidfile controller-manager)"
  log "starting kube-controller-manager"
  # --port 0 --secure-port 0: no listener at all (its health is seen through what it does)
  spawn controller-manager "$bin" \
    --kubeconfig "$kcm_kubeconfig" --leader-elect=false \
    --use-service-account-credentials=true \
    --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
    --controllers '*,-nodelifecycle' \
    --port 0 --secure-port 0 --profiling=false --v 1
  local pid
  pid="$(svc_pid controller-manager)"
  sleep 0.5
  proc_alive "$pid" || start_failed controller-manager "$pid" "kube-controller-manager exited at once"
  log "kube-controller-manager started (pid $pid)"
}

# the service-account controller made the default namespace's "default" account (pods need it)
default_sa_exists() { kubectl_admin -n "$pod_namespace" get serviceaccount default -o name; }

# ============================================================================ test kubelet
kubelet_ready() {
  curl -fsS -m 2 --cacert "$pki/ca.crt" --cert "$pki/apiserver-kubelet-client.crt" --key "$pki/apiserver-kubelet-client.key" \
    "https://127.0.0.1:$(svc_port kubelet "$kubelet_port")/healthz" | grep -qx ok
}

kubelet_start() {
  local bin="$kube_bin/vigil-test-kubelet"
  if svc_alive kubelet "$bin"; then
    local _
    for _ in $(seq 1 50); do kubelet_ready && break; sleep 0.1; done
    kubelet_ready || { show_log "$(logfile kubelet)"; die "vigil-test-kubelet (pid $(svc_pid kubelet)) runs but does not answer"; }
    log "vigil-test-kubelet already running (pid $(svc_pid kubelet), port $(svc_port kubelet "$kubelet_port"))"
    return 0
  fi
  rm -f "$(pidfile kubelet)" "$(portfile kubelet)"
  port_open "$kubelet_port" && die "port $kubelet_port on 127.0.0.1 is in use; choose another with VIGIL_DEV_KUBELET_PORT"

  local run_as=() shell=/bin/sh
  [[ -x /bin/bash ]] && shell=/bin/bash
  install -d -m 755 "$shell_home"
  if [[ -n "$exec_user" ]]; then
    id -u "$exec_user" >/dev/null 2>&1 || die "VIGIL_DEV_KUBE_EXEC_USER=$exec_user: no such user"
    [[ "$(id -u)" == 0 || "$(id -un)" == "$exec_user" ]] || die "VIGIL_DEV_KUBE_EXEC_USER needs root"
    chown "$exec_user:" "$shell_home"
    run_as=(--run-as "$exec_user")
  fi
  [[ -f "$exec_log" ]] || : >"$exec_log"
  chmod 644 "$exec_log"
  [[ -f "$container_log" ]] \
    || printf 'vigil-test-kubelet: the log of container %s of pod %s/%s is %s\n' "$container_name" "$pod_namespace" "$pod_name" "$container_log" >"$container_log"
  chmod 644 "$container_log"

  log "starting vigil-test-kubelet on https://127.0.0.1:$kubelet_port (exec runs as ${exec_user:-$(id -un)})"
  spawn kubelet "$bin" --listen "127.0.0.1:$kubelet_port" \
    --tls-cert "$pki/kubelet.crt" --tls-key "$pki/kubelet.key" --client-ca "$pki/ca.crt" \
    --namespace "$pod_namespace" --pod "$pod_name" --container "$container_name" \
    --exec-log "$exec_log" --log-file "$container_log" --workdir "$shell_home" --shell "$shell" "${run_as[@]}"
  printf '%s\n' "$kubelet_port" >"$(portfile kubelet)"
  local pid
  pid="$(svc_pid kubelet)"
  wait_ready kubelet "$pid" 20 kubelet_ready || start_failed kubelet "$pid" "vigil-test-kubelet failed to start on port $kubelet_port"
  log "vigil-test-kubelet ready (pid $pid)"
}

# ============================================================================ objects
apply_objects() {
  local now actual_kubelet_port
  now="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  actual_kubelet_port="$(svc_port kubelet "$kubelet_port")"

  kubectl_admin apply -f "$kube_src_dir/gateway-impersonate.yaml" >/dev/null \
    || die "applying $kube_src_dir/gateway-impersonate.yaml failed"

  kubectl_admin apply -f - >/dev/null <<EOF || die "creating Node $node_name failed"
apiVersion: v1
kind: Node
metadata:
  name: $node_name
  labels:
    kubernetes.io/hostname: $node_name
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    app.kubernetes.io/part-of: vigil-dev
EOF
  # the not-ready taint that node admission put on it would be the node lifecycle controller's
  # to remove (that controller does not run)
  kubectl_admin patch node "$node_name" --type merge -p '{"spec":{"taints":null}}' >/dev/null \
    || die "untainting Node $node_name failed"
  kubectl_admin patch node "$node_name" --subresource status --type merge -p "$(cat <<EOF
{"status": {
  "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": "$node_name"}],
  "daemonEndpoints": {"kubeletEndpoint": {"Port": $actual_kubelet_port}},
  "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                  "message": "vigil-test-kubelet is serving", "lastHeartbeatTime": "$now", "lastTransitionTime": "$now"}],
  "capacity": {"cpu": "2", "memory": "4Gi", "pods": "10"},
  "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "10"},
  "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "$(uname -r)",
               "osImage": "vigil-test-kubelet (commands run on the host)", "containerRuntimeVersion": "vigil-test-kubelet://$kube_version",
               "kubeletVersion": "$kube_version", "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"}
}}
EOF
)" >/dev/null || die "patching the status of Node $node_name failed"

  # pods need their namespace's "default" service account (made by the controller manager)
  local _
  for _ in $(seq 1 150); do default_sa_exists >/dev/null 2>&1 && break; sleep 0.2; done
  default_sa_exists >/dev/null 2>&1 || { show_log "$(logfile controller-manager)"; die "no service account default/default after 30 s (kube-controller-manager not working?)"; }

  kubectl_admin apply -f - >/dev/null <<EOF || die "creating Pod $pod_namespace/$pod_name failed"
apiVersion: v1
kind: Pod
metadata:
  name: $pod_name
  namespace: $pod_namespace
  labels:
    app: vigil-dev-shell
    app.kubernetes.io/part-of: vigil-dev
spec:
  nodeName: $node_name
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 0
  tolerations:
  - operator: Exists
  containers:
  - name: $container_name
    image: vigil/dev-shell
    command: ["/bin/sh"]
    stdin: true
    tty: true
EOF
  kubectl_admin -n "$pod_namespace" patch pod "$pod_name" --subresource status --type merge -p "$(cat <<EOF
{"status": {
  "phase": "Running", "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
  "startTime": "$now",
  "conditions": [
    {"type": "Initialized", "status": "True", "lastTransitionTime": "$now"},
    {"type": "Ready", "status": "True", "lastTransitionTime": "$now"},
    {"type": "ContainersReady", "status": "True", "lastTransitionTime": "$now"},
    {"type": "PodScheduled", "status": "True", "lastTransitionTime": "$now"}],
  "containerStatuses": [{"name": "$container_name", "ready": true, "started": true, "restartCount": 0,
    "image": "vigil/dev-shell", "imageID": "vigil/dev-shell@sha256:0000000000000000000000000000000000000000000000000000000000000000",
    "containerID": "vigil://$pod_namespace-$pod_name-$container_name",
    "state": {"running": {"startedAt": "$now"}}}]
}}
EOF
)" >/dev/null || die "patching the status of Pod $pod_namespace/$pod_name failed"

  local phase=""
  for _ in $(seq 1 50); do
    phase="$(kubectl_admin -n "$pod_namespace" get pod "$pod_name" -o 'jsonpath={.status.phase}' 2>/dev/null || true)"
    [[ "$phase" == Running ]] && break
    sleep 0.2
  done
  [[ "$phase" == Running ]] || die "Pod $pod_namespace/$pod_name is not Running (phase '$phase')"
}

# ============================================================================ env file
write_env() {
  local tmp="$env_file.tmp"
  (umask 077
   {
     printf '# Written by deploy/dev/kube.sh start; source it: . %q\n' "$env_file"
     # shellcheck disable=SC2016 # the comment names the variables, unexpanded
     printf '%s\n' \
       '# kube-apiserver v1.20.2 on $VIGIL_DEV_KUBE_URL (CA $VIGIL_DEV_KUBE_CA). Admin: $VIGIL_DEV_KUBE_ADMIN_KUBECONFIG' \
       '# (user vigil-admin, group system:masters). The gateway'"'"'s own credential: the bearer token in' \
       '# $VIGIL_DEV_KUBE_GATEWAY_TOKEN_FILE (user vigil-gateway, allowed nothing but impersonate on users,' \
       '# groups, serviceaccounts, userextras/session-id and userextras/model), or the client certificate' \
       '# $VIGIL_DEV_KUBE_GATEWAY_CLIENT_CERT with its key (user vigil-gateway-cert, the same grant).' \
       '# No Impersonate-Uid in 1.20.' \
       '# Ground truth: $VIGIL_DEV_KUBE_AUDIT_LOG (JSON lines, level Metadata; "user" and "impersonatedUser")' \
       '# and $VIGIL_DEV_KUBE_EXEC_LOG (one JSON line per exec/attach/portforward the kubelet ran, and' \
       '# per log request it answered, with its bytes). The container'"'"'s log is $VIGIL_DEV_KUBE_CONTAINER_LOG:' \
       '# `kubectl logs -f` follows it (append a line, it arrives).' \
       '# Pod $VIGIL_DEV_KUBE_NAMESPACE/$VIGIL_DEV_KUBE_POD (container $VIGIL_DEV_KUBE_CONTAINER) on node' \
       '# $VIGIL_DEV_KUBE_NODE: exec runs on this host; port-forward reaches 127.0.0.1:PORT of this host.'
     printf 'export %s=%q\n' \
       VIGIL_DEV_KUBE_URL "https://127.0.0.1:$(svc_port apiserver "$kube_port")" \
       VIGIL_DEV_KUBE_PORT "$(svc_port apiserver "$kube_port")" \
       VIGIL_DEV_KUBE_CA "$ca_crt" \
       VIGIL_DEV_KUBE_ADMIN_KUBECONFIG "$admin_kubeconfig" \
       VIGIL_DEV_KUBE_ADMIN_TOKEN_FILE "$admin_token_file" \
       VIGIL_DEV_KUBE_ADMIN_USER "$admin_user" \
       VIGIL_DEV_KUBE_GATEWAY_TOKEN_FILE "$gateway_token_file" \
       VIGIL_DEV_KUBE_GATEWAY_KUBECONFIG "$gateway_kubeconfig" \
       VIGIL_DEV_KUBE_GATEWAY_USER "$gateway_user" \
       VIGIL_DEV_KUBE_GATEWAY_CLIENT_CERT "$pki/gateway-client.crt" \
       VIGIL_DEV_KUBE_GATEWAY_CLIENT_KEY "$pki/gateway-client.key" \
       VIGIL_DEV_KUBE_GATEWAY_CERT_USER "$gateway_cert_user" \
       VIGIL_DEV_KUBE_AUDIT_LOG "$audit_log" \
       VIGIL_DEV_KUBE_EXEC_LOG "$exec_log" \
       VIGIL_DEV_KUBE_CONTAINER_LOG "$container_log" \
       VIGIL_DEV_KUBE_NODE "$node_name" \
       VIGIL_DEV_KUBE_NAMESPACE "$pod_namespace" \
       VIGIL_DEV_KUBE_POD "$pod_name" \
       VIGIL_DEV_KUBE_CONTAINER "$container_name" \
       VIGIL_DEV_KUBE_VERSION "$kube_version" \
       VIGIL_DEV_KUBELET_PORT "$(svc_port kubelet "$kubelet_port")" \
       VIGIL_DEV_ETCD_PORT "$(svc_port etcd "$etcd_port")" \
       VIGIL_DEV_KUBE_DIR "$kube_dir"
   } >"$tmp")
  chmod 644 "$tmp"
  mv -f "$tmp" "$env_file"
  log "env written to $env_file"
}

# ============================================================================ commands
prepare_dirs() {
  command -v openssl >/dev/null || die "openssl not found: run '$0 install' first"
  command -v curl >/dev/null || die "curl not found: run '$0 install' first"
  local b
  for b in "${binaries[@]}"; do
    [[ -x "$kube_bin/$b" ]] || die "$kube_bin/$b not found: run '$0 install' first"
  done
  [[ -z "$(stale_binaries)" ]] \
    || log "WARNING: $(stale_binaries | tr '\n' ' ')in $kube_bin are not those this checkout builds (test kubelet changed?): run '$0 install'"
  kubectl="$(resolve_kubectl)"
  # a state dir that we create is marked as the dev scripts' (servers.sh uses the same marker)
  if [[ ! -d "$dev_dir" ]] || [[ -z "$(ls -A "$dev_dir")" ]]; then
    mkdir -p "$dev_dir"
    chmod 755 "$dev_dir"
    touch "$dev_dir/.vigil-dev"
  fi
  if [[ ! -d "$kube_dir" ]]; then
    install -d -m 755 "$kube_dir"
    touch "$marker"
  fi
}

cmd_start() {
  local started=$SECONDS
  prepare_dirs
  make_pki
  make_gateway_client_cert
  make_tokens
  write_kubeconfig "$admin_kubeconfig" "$admin_user" "$admin_token_file"
  write_kubeconfig "$gateway_kubeconfig" "$gateway_user" "$gateway_token_file"
  write_kubeconfig "$kcm_kubeconfig" system:kube-controller-manager "$kcm_token_file"
  etcd_start
  apiserver_start
  kcm_start
  kubelet_start
  apply_objects
  write_env
  log "kube cluster up in $((SECONDS - started)) s: kubectl --kubeconfig $admin_kubeconfig get pods; env: . $env_file"
}

cmd_stop() {
  svc_stop kubelet "$kube_bin/vigil-test-kubelet"
  svc_stop controller-manager "$kube_bin/kube-controller-manager"
  svc_stop apiserver "$kube_bin/kube-apiserver"
  svc_stop etcd /usr/bin/etcd
}

cmd_status() {
  local rc=0
  if svc_alive etcd /usr/bin/etcd && etcd_ready; then
    printf 'etcd                     running  pid %s  http://127.0.0.1:%s\n' "$(svc_pid etcd)" "$(svc_port etcd "$etcd_port")"
  else
    printf 'etcd                     stopped\n'; rc=3
  fi
  kubectl="$(command -v kubectl || true)"
  if svc_alive apiserver "$kube_bin/kube-apiserver" && [[ -n "$kubectl" ]] && apiserver_ready; then
    printf 'kube-apiserver           running  pid %s  https://127.0.0.1:%s  audit %s\n' "$(svc_pid apiserver)" "$(svc_port apiserver "$kube_port")" "$audit_log"
  else
    printf 'kube-apiserver           stopped\n'; rc=3
  fi
  if svc_alive controller-manager "$kube_bin/kube-controller-manager"; then
    printf 'kube-controller-manager  running  pid %s\n' "$(svc_pid controller-manager)"
  else
    printf 'kube-controller-manager  stopped\n'; rc=3
  fi
  if svc_alive kubelet "$kube_bin/vigil-test-kubelet" && kubelet_ready; then
    printf 'vigil-test-kubelet       running  pid %s  https://127.0.0.1:%s  exec log %s\n' "$(svc_pid kubelet)" "$(svc_port kubelet "$kubelet_port")" "$exec_log"
  else
    printf 'vigil-test-kubelet       stopped\n'; rc=3
  fi
  [[ -f "$env_file" ]] && printf 'env                      %s\n' "$env_file"
  return "$rc"
}

cmd_clean() {
  cmd_stop
  if [[ -d "$kube_dir" ]]; then
    [[ -f "$marker" ]] || die "$kube_dir was not created by kube.sh (no $marker); not deleting it"
    log "removing $kube_dir"
    rm -rf -- "$kube_dir"
  fi
}

kubectl=""
case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  clean) cmd_clean ;;
  prune) cmd_prune ;;
  *) printf 'usage: %s install|start|stop|status|clean|prune\n' "$0" >&2; exit 2 ;;
esac
