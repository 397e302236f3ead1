#!/usr/bin/env bash
# Side-by-side Kubernetes API: a kube-rs client straight to the dev kube-apiserver (its admin
# token) vs through the Vigil Kubernetes gateway (a Vigil token; audit on, the caller
# impersonated), plus the throughput of a `kubectl exec` stream on both paths.
#
#   loadtest/kube.sh                                   # defaults: 3 rounds, 10 s per run
#   DURATION=5 ROUNDS=1 EXEC_MB=64 loadtest/kube.sh    # quick pass
#   PROFILE=1 loadtest/kube.sh                         # + perf profile of the gateway (get, most callers)
#
# Run as root on the dev machine (see loadtest/README.md). It reuses the dev servers of
# deploy/dev/servers.sh when they run (it needs the OIDC provider, the kube-apiserver and the
# test kubelet), otherwise starts them and stops them at the end. It builds the release gateway,
# CLI and load generator (loadtest/kube-load, kube-rs on rustls), seeds NAMESPACE with PODS Pods
# (objects only: the dev cluster schedules nothing), binds the agent `agent-ops` to
# cluster-admin (ClusterRoleBinding vigil-loadtest, removed at the end if this run made it),
# and in each round starts a fresh gateway in a temporary directory. Each round runs every
# measure against every target, in an order that rotates:
#   direct     kube-rs/kubectl -> kube-apiserver, $VIGIL_DEV_KUBE_ADMIN_KUBECONFIG (system:masters):
#              the baseline of the goals
#   direct-as  kube-rs/kubectl -> kube-apiserver with the gateway's own token, impersonating what
#              Vigil impersonates (user agent-ops, groups vigil:ops vigil:dba system:authenticated,
#              extras session-id and model): the API server's share of the cost of the Vigil
#              path, without the gateway
#   vigil      kube-rs/kubectl -> vigil-node (TLS, Vigil token) -> kube-apiserver (the gateway's
#              token, impersonating the caller)
#   haproxy    kube-rs/kubectl -> HAProxy (TLS; the Vigil token's RS256 signature, issuer,
#              audience and expiry checked with jwt_verify, on every request) -> kube-apiserver
#              (pooled TLS keep-alive, the gateway's token, impersonating as Vigil does): the
#              reference, a C proxy doing the same hops without Vigil's work (no audit record,
#              no policy, no masking, no request classification)
# Measures:
#   get    kube-rs Api<Pod>::get of one Pod, CONCURRENCY callers on one client     calls/s
#   list   kube-rs Api<Pod>::list of the PODS Pods of NAMESPACE, the same           calls/s
#   exec   kubectl exec POD -- head -c ${EXEC_MB}M /dev/zero, stdout counted        MiB/s
# get and list also report p50/p99 latency (added = vigil - direct, and vigil - direct-as), the
# proxy's CPU per call (utime+stime of vigil-node, or of haproxy, from /proc/PID/stat over the
# measured window, sampled by the load generator itself) and the API server's. At the end of
# each round the gateway is stopped cleanly and `vigil audit verify` checks its audit log
# (records and the exec recordings); the audit dir is then deleted (a LIST's response record
# keeps 64 KiB of its body, and every exec byte is recorded). The goals are only reported: they never change the exit status; a failed
# call or an audit log that does not verify does (exit 1).
#
# Settings (environment):
#   ROUNDS=3             interleaved rounds; the table shows the median per measure and target
#   DURATION=10          measured seconds per get/list run
#   WARMUP=2             seconds before each measured window (connections, TLS, sessions)
#   CONCURRENCY="1 8"    callers per get/list run (each value is a run)
#   EXEC_MB=256          MiB per exec stream (0: exec not measured)
#   MEASURES="get list exec"
#   TARGETS="direct direct-as vigil haproxy"   (direct and vigil at least)
#   NAMESPACE=vigil-load PODS=100   where the Pods are (made once; KEEP_NAMESPACE=1 keeps them)
#   VIGIL_KUBE_PORT=16443 VIGIL_ADMIN_PORT=19191   the gateway's listen ports (127.0.0.1)
#   HAPROXY_KUBE_PORT=16444   HAProxy's (the haproxy target)
#   HAPROXY_CHECK=1      0: HAProxy forwards without checking the token (the bare proxy's floor)
#   VIGIL_DEV_DIR=/tmp/vigil-dev   dev servers' state dir (servers.sh)
#   CARGO_TARGET_DIR=/var/cache/vigil/target   SKIP_BUILD=1 uses the binaries already there
#   BUILD_PROFILE=release  the cargo profile built and run (`profiling`: the same code with
#                        line tables, for perf)
#   VIGIL_NODE_BIN=PATH  run this vigil-node instead (a build of another commit, for a before and
#                        after in the same hour)
#   KEEP_WORKDIR=1       keep the temporary directory (logs, samples, audit logs, recordings)
#   AUDIT_SYNC=write     the gateway's audit.sync: write, or fsync
#   PROFILE=1            perf record -e cpu-clock -g the gateway during the last round's vigil
#                        run of PROFILE_MEASURE (get) with the most callers; top symbols printed
set -euo pipefail
export LC_ALL=C # EPOCHREALTIME with a '.', awk number formats

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-2}"
read -r -a CONCURRENCY <<<"${CONCURRENCY:-1 8}"
EXEC_MB="${EXEC_MB:-256}"
read -r -a MEASURES <<<"${MEASURES:-get list exec}"
read -r -a TARGETS <<<"${TARGETS:-direct direct-as vigil haproxy}"
NAMESPACE="${NAMESPACE:-vigil-load}"
PODS="${PODS:-100}"
KEEP_NAMESPACE="${KEEP_NAMESPACE:-0}"
VIGIL_KUBE_PORT="${VIGIL_KUBE_PORT:-16443}"
VIGIL_ADMIN_PORT="${VIGIL_ADMIN_PORT:-19191}"
HAPROXY_KUBE_PORT="${HAPROXY_KUBE_PORT:-16444}"
HAPROXY_CHECK="${HAPROXY_CHECK:-1}"
[[ "$HAPROXY_CHECK" == 0 || "$HAPROXY_CHECK" == 1 ]] || die "HAPROXY_CHECK must be 0 or 1"
PROFILE="${PROFILE:-0}"
PROFILE_MEASURE="${PROFILE_MEASURE:-get}"

# The issue's goals (reported, never enforced).
GOAL_RATIO=0.7   # vigil / direct calls per second
GOAL_CPU_US=100  # gateway CPU per call

script=kube.sh
# shellcheck source=loadtest/lib.sh
source "$here/lib.sh" # the common settings (dev_dir, target_dir, SKIP_BUILD, KEEP_WORKDIR, AUDIT_SYNC); log, die, stop_pid, ratio …

for v in ROUNDS DURATION WARMUP EXEC_MB PODS VIGIL_KUBE_PORT VIGIL_ADMIN_PORT HAPROXY_KUBE_PORT; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a whole number (got '${!v}')"
done
((ROUNDS > 0 && DURATION > 0 && PODS > 0)) || die "ROUNDS, DURATION, PODS must be > 0"
((${#CONCURRENCY[@]} > 0)) || die "CONCURRENCY is empty"
for c in "${CONCURRENCY[@]}"; do
  [[ "$c" =~ ^[1-9][0-9]*$ ]] || die "CONCURRENCY holds '$c': whole numbers > 0 only"
done
for m in "${MEASURES[@]}"; do
  case "$m" in get | list | exec) ;; *) die "unknown measure '$m'" ;; esac
done
for t in "${TARGETS[@]}"; do
  case "$t" in direct | direct-as | vigil | haproxy) ;; *) die "unknown target '$t'" ;; esac
done
[[ " ${TARGETS[*]} " == *" direct "* && " ${TARGETS[*]} " == *" vigil "* ]] || die "TARGETS must hold direct and vigil"
[[ "$NAMESPACE" =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] || die "NAMESPACE '$NAMESPACE' is not a namespace name"
case "$PROFILE_MEASURE" in get | list) ;; *) die "PROFILE_MEASURE must be get or list" ;; esac
[[ "$(id -u)" == 0 ]] || die "run as root (like the dev servers)"
has_measure() { [[ " ${MEASURES[*]} " == *" $1 "* ]]; }
has_measure exec && ((EXEC_MB == 0)) && MEASURES=("${MEASURES[@]/exec/}")
for tool in kubectl curl node; do
  command -v "$tool" >/dev/null || die "$tool not found"
done
has_target() { [[ " ${TARGETS[*]} " == *" $1 "* ]]; }
has_target haproxy && ! command -v haproxy >/dev/null && die "haproxy not found (deploy/dev/setup.sh installs it), or leave it out of TARGETS"
if [[ "$PROFILE" == 1 ]]; then
  has_measure "$PROFILE_MEASURE" || die "PROFILE=1 profiles the vigil $PROFILE_MEASURE runs: keep it in MEASURES"
  command -v perf >/dev/null || die "PROFILE=1 needs perf"
fi

# ---------------------------------------------------------------------------- cleanup
work=""
vigil_pid=""
haproxy_pid=""
perf_pid=""
started_servers=0
made_binding=0
seeded=0

admin_kubectl() { kubectl --kubeconfig "$VIGIL_DEV_KUBE_ADMIN_KUBECONFIG" --request-timeout 30s "$@"; }

cleanup() {
  local rc=$?
  set +e
  [[ -n "$perf_pid" ]] && { kill -INT "$perf_pid" 2>/dev/null; wait "$perf_pid" 2>/dev/null; }
  stop_pid "$vigil_pid" vigil-node
  stop_pid "$haproxy_pid" haproxy
  if ((seeded)) && [[ "$KEEP_NAMESPACE" != 1 ]]; then
    admin_kubectl delete namespace "$NAMESPACE" --wait=false >/dev/null 2>&1 || log "could not delete namespace $NAMESPACE"
  fi
  ((made_binding)) && { admin_kubectl delete clusterrolebinding vigil-loadtest >/dev/null 2>&1 || log "could not delete clusterrolebinding vigil-loadtest"; }
  finish "$rc"
}
trap_cleanup

# ---------------------------------------------------------------------------- prerequisites
ports_free VIGIL_KUBE_PORT VIGIL_ADMIN_PORT
has_target haproxy && ports_free HAPROXY_KUBE_PORT

# ---------------------------------------------------------------------------- dev servers
# The gateway needs the OIDC provider (its [identity] issuer) and the API server (its cluster);
# exec needs the test kubelet.
use_dev_servers oidc kube-apiserver vigil-test-kubelet
for v in VIGIL_OIDC_ISSUER VIGIL_OIDC_DIR VIGIL_DEV_KUBE_URL VIGIL_DEV_KUBE_CA VIGIL_DEV_KUBE_ADMIN_KUBECONFIG \
         VIGIL_DEV_KUBE_GATEWAY_TOKEN_FILE VIGIL_DEV_KUBE_DIR VIGIL_DEV_KUBE_NAMESPACE VIGIL_DEV_KUBE_POD \
         VIGIL_DEV_KUBE_CONTAINER VIGIL_DEV_KUBE_AUDIT_LOG; do
  [[ -n "${!v:-}" ]] || die "$dev_dir/env has no $v: restart the dev servers with this checkout's deploy/dev/servers.sh"
done
apiserver_pid="$(cat "$VIGIL_DEV_KUBE_DIR/apiserver.pid" 2>/dev/null || true)"
{ [[ -n "$apiserver_pid" ]] && proc_alive "$apiserver_pid"; } || die "no kube-apiserver process (pid file $VIGIL_DEV_KUBE_DIR/apiserver.pid)"

# ---------------------------------------------------------------------------- build
# Two cargo runs: built together, the load generator's dependencies (kube-rs) would change the
# features of crates the gateway shares with it, and so the gateway binary other scripts use.
if [[ "$SKIP_BUILD" != 1 ]]; then
  log "building the gateway, CLI and load generator (profile $BUILD_PROFILE, CARGO_TARGET_DIR=$target_dir; may wait for another build's lock)"
  (cd "$repo" && CARGO_TARGET_DIR="$target_dir" cargo build --profile "$BUILD_PROFILE" -p vigil-node -p vigil-cli) \
    || die "cargo build failed"
  (cd "$repo" && CARGO_TARGET_DIR="$target_dir" cargo build --profile "$BUILD_PROFILE" -p vigil-kube-load) \
    || die "cargo build failed"
fi
vigil_node="${VIGIL_NODE_BIN:-$target_dir/$BUILD_PROFILE/vigil-node}"
vigil_cli="$target_dir/$BUILD_PROFILE/vigil"
kube_load="$target_dir/$BUILD_PROFILE/kube-load"
for b in "$vigil_node" "$vigil_cli" "$kube_load"; do
  [[ -x "$b" ]] || die "$b missing (build first, or unset SKIP_BUILD)"
done

# ---------------------------------------------------------------------------- work dir
# Disk: the gateway's audit log (a LIST's response record keeps 64 KiB of the body: about
# 1 GB per round at the defaults on this machine) and the exec recordings (2 x EXEC_MB per
# round, counting the exec's own bytes once per path), deleted after each round's verification.
need_mb=$((1536 + EXEC_MB * 2))
free_mb="$(df -Pm /tmp | awk 'NR == 2 { print $4 }')"
((free_mb >= need_mb)) || die "about ${need_mb} MB of disk needed in /tmp (the gateway's audit log and recordings), ${free_mb} MB free"

work="$(mktemp -d /tmp/vigil-kube.XXXXXX)"
chmod 755 "$work"
mkdir -p "$work/samples"
results="$work/results.tsv" # round measure callers target value calls vigil_ticks apiserver_ticks client_ticks
: >"$results"

# The agent's rights in the cluster: the gateway impersonates agent-ops.
if ! admin_kubectl get clusterrolebinding vigil-loadtest >/dev/null 2>&1; then
  admin_kubectl create clusterrolebinding vigil-loadtest --clusterrole=cluster-admin --user=agent-ops >/dev/null \
    || die "cannot create the clusterrolebinding vigil-loadtest"
  made_binding=1
fi
log "seeding namespace $NAMESPACE with $PODS Pods"
seeded=1
"$kube_load" seed --kubeconfig "$VIGIL_DEV_KUBE_ADMIN_KUBECONFIG" --namespace "$NAMESPACE" --pods "$PODS" \
  2>"$work/seed.log" || { show_log "$work/seed.log"; die "seeding $NAMESPACE failed"; }
list_bytes="$(admin_kubectl get --raw "/api/v1/namespaces/$NAMESPACE/pods" | wc -c)"
get_bytes="$(admin_kubectl get --raw "/api/v1/namespaces/$NAMESPACE/pods/pod-000" | wc -c)"

# A fresh Vigil token for agent-ops when the one we have is older than 4 minutes (the dev
# provider's live 10; the gateway checks the token of every request), in the kubeconfig.
token_at=-1000
vigil_kubeconfig="$work/vigil.kubeconfig"
haproxy_kubeconfig="$work/haproxy.kubeconfig"
fresh_kubeconfig() { # DIR (the round's, whose listener certificate is the CA)
  ((SECONDS - token_at < 240)) && [[ -f "$vigil_kubeconfig" ]] && return 0
  local token
  token="$(node "$VIGIL_OIDC_DIR/token.mjs" --issuer "$VIGIL_OIDC_ISSUER" --client agent-ops --secret agent-ops-secret)" \
    || die "could not get an access token"
  token_at=$SECONDS
  agent_kubeconfig haproxy "$HAPROXY_KUBE_PORT" "$VIGIL_DEV_KUBE_CA" "$token" >"$haproxy_kubeconfig"
  agent_kubeconfig vigil "$VIGIL_KUBE_PORT" "$1/data/tls-kubernetes/cert.pem" "$token" >"$vigil_kubeconfig"
}
# agent_kubeconfig NAME PORT CA TOKEN: the agent's kubeconfig for a proxy on 127.0.0.1:PORT
# serving the dev cluster under /clusters/dev
agent_kubeconfig() {
  cat <<EOF
{"apiVersion": "v1", "kind": "Config",
 "clusters": [{"name": "$1", "cluster": {"server": "https://127.0.0.1:$2/clusters/dev",
   "certificate-authority": "$3"}}],
 "users": [{"name": "agent-ops", "user": {"token": "$4"}}],
 "contexts": [{"name": "$1", "context": {"cluster": "$1", "user": "agent-ops"}}],
 "current-context": "$1"}
EOF
}
# direct-as: the gateway's credential, impersonating as the gateway does (kube-rs and kubectl
# read `as`, `as-groups` and `as-user-extra` from a kubeconfig).
as_kubeconfig="$work/direct-as.kubeconfig"
cat >"$as_kubeconfig" <<EOF
{"apiVersion": "v1", "kind": "Config",
 "clusters": [{"name": "dev", "cluster": {"server": "$VIGIL_DEV_KUBE_URL", "certificate-authority": "$VIGIL_DEV_KUBE_CA"}}],
 "users": [{"name": "gateway", "user": {"token": "$(tr -d '[:space:]' <"$VIGIL_DEV_KUBE_GATEWAY_TOKEN_FILE")",
   "as": "agent-ops", "as-groups": ["vigil:ops", "vigil:dba", "system:authenticated"],
   "as-user-extra": {"session-id": ["kube-bench"], "model": ["claude-opus"]}}}],
 "contexts": [{"name": "dev", "context": {"cluster": "dev", "user": "gateway"}}],
 "current-context": "dev"}
EOF
kubeconfig_of() {
  case "$1" in
    vigil) echo "$vigil_kubeconfig" ;;
    haproxy) echo "$haproxy_kubeconfig" ;;
    direct-as) echo "$as_kubeconfig" ;;
    *) echo "$VIGIL_DEV_KUBE_ADMIN_KUBECONFIG" ;;
  esac
}
# rotated N: the targets, rotated N places (the order of a run)
rotated() { local n=${#TARGETS[@]} i; for ((i = 0; i < n; i++)); do printf '%s ' "${TARGETS[$(((i + $1) % n))]}"; done; }

# ---------------------------------------------------------------------------- Vigil
vigil_config() { # DIR
  node_config "$1" kube-bench
  cat <<EOF

[kubernetes]
listen = "127.0.0.1:$VIGIL_KUBE_PORT"

[[kubernetes.clusters]]
name = "dev"
server = "$VIGIL_DEV_KUBE_URL"
ca_file = "$VIGIL_DEV_KUBE_CA"
token = { file = "$VIGIL_DEV_KUBE_GATEWAY_TOKEN_FILE" }
group_prefix = "vigil:"
allow = { client_ids = ["agent-ops"] }
EOF
}

# ---------------------------------------------------------------------------- HAProxy (the reference)
# What HAProxy does of the gateway's job, per request: the bearer token's signature (RS256, the
# dev provider's key), issuer, audience and expiry; the cluster's path prefix taken off; the
# gateway's token and the impersonation headers (the user from the token's `sub`, its model
# from `model`; the groups and the session id fixed, as the benchmark's caller has them) sent on
# pooled keep-alive TLS connections to the API server. Its listener uses the API server's
# certificate (the dev CA's, for 127.0.0.1). No log, like the other targets' own.
start_haproxy() {
  local dir="$work/haproxy" jwks check="rs256 signed issuer audience live"
  [[ "$HAPROXY_CHECK" == 1 ]] || check="{ var(txn.token) -m found }"
  mkdir -p "$dir"
  jwks="$(curl -fsS -m 5 "$VIGIL_OIDC_ISSUER/jwks")" || die "cannot read the dev provider's keys"
  JWKS="$jwks" node -e '
    const { createPublicKey } = require("crypto");
    const keys = JSON.parse(process.env.JWKS).keys.filter((k) => k.kty === "RSA");
    if (keys.length !== 1) throw new Error(`expected one RSA key, got ${keys.length}`);
    process.stdout.write(createPublicKey({ key: keys[0], format: "jwk" }).export({ type: "spki", format: "pem" }));
  ' >"$dir/oidc.pem" || die "cannot make a PEM of the dev provider's key"
  cat "$VIGIL_DEV_KUBE_DIR/pki/apiserver.crt" "$VIGIL_DEV_KUBE_DIR/pki/apiserver.key" >"$dir/listener.pem"
  cat >"$dir/haproxy.cfg" <<EOF
global
  nbthread $(nproc)
  maxconn 1000
defaults
  mode http
  timeout connect 5s
  timeout client 120s
  timeout server 120s
  timeout tunnel 1h
  http-reuse always
frontend kube
  bind 127.0.0.1:$HAPROXY_KUBE_PORT ssl crt $dir/listener.pem alpn http/1.1
  http-request set-var(txn.token) http_auth_bearer
  http-request set-var(txn.now) date
  http-request set-var(txn.exp) var(txn.token),jwt_payload_query('\$.exp','int')
  acl signed var(txn.token),jwt_verify("RS256","$dir/oidc.pem") -m int 1
  acl rs256 var(txn.token),jwt_header_query('\$.alg') -m str RS256
  acl issuer var(txn.token),jwt_payload_query('\$.iss') -m str $VIGIL_OIDC_ISSUER
  acl audience var(txn.token),jwt_payload_query('\$.aud') -m str urn:vigil:gateway
  acl live var(txn.exp),sub(txn.now) -m int gt 0
  acl cluster path_beg /clusters/dev/
  http-request deny deny_status 401 unless $check
  http-request deny deny_status 404 unless cluster
  http-request replace-path /clusters/dev(/.*) \1
  http-request set-header Impersonate-User %[var(txn.token),jwt_payload_query('\$.sub')]
  http-request set-header Impersonate-Extra-Model %[var(txn.token),jwt_payload_query('\$.model')]
  http-request set-header Impersonate-Extra-Session-Id haproxy-bench
  http-request set-header Impersonate-Group vigil:ops
  http-request add-header Impersonate-Group vigil:dba
  http-request add-header Impersonate-Group system:authenticated
  http-request set-header Authorization "Bearer $(tr -d '[:space:]' <"$VIGIL_DEV_KUBE_GATEWAY_TOKEN_FILE")"
  default_backend apiserver
backend apiserver
  server api ${VIGIL_DEV_KUBE_URL#https://} ssl verify required ca-file $VIGIL_DEV_KUBE_CA
EOF
  haproxy -c -q -f "$dir/haproxy.cfg" >"$dir/check.log" 2>&1 || { show_log "$dir/check.log"; die "haproxy refuses its configuration"; }
  haproxy -db -f "$dir/haproxy.cfg" </dev/null >"$dir/haproxy.log" 2>&1 &
  haproxy_pid=$!
  for _ in $(seq 1 50); do port_free "$HAPROXY_KUBE_PORT" || break; sleep 0.1; done
  port_free "$HAPROXY_KUBE_PORT" && { show_log "$dir/haproxy.log"; die "haproxy did not listen on $HAPROXY_KUBE_PORT"; }
  log "haproxy ready (pid $haproxy_pid, 127.0.0.1:$HAPROXY_KUBE_PORT, token checked: $HAPROXY_CHECK, $(haproxy -v | sed -n 's/^HAProxy version \([^ ]*\).*/\1/p'))"
}
# the proxy process of a target (whose CPU the load generator samples), or vigil-node's
proxy_pid() { if [[ "$1" == haproxy ]]; then echo "$haproxy_pid"; else echo "$vigil_pid"; fi; }

# start_vigil DIR: a fresh gateway on DIR/vigil.toml; sets vigil_pid at once (so the cleanup
# trap stops it) and waits until it is ready.
start_vigil() {
  start_gateway "$1" "$VIGIL_KUBE_PORT"
  token_at=-1000 # a new listener certificate: write the kubeconfig again
  fresh_kubeconfig "$1"
  log "vigil-node ready (pid $vigil_pid, kubernetes 127.0.0.1:$VIGIL_KUBE_PORT, admin $VIGIL_ADMIN_PORT)"
}

# ---------------------------------------------------------------------------- measuring
# calls_run ROUND MEASURE CALLERS TARGET: one kube-load run; appends a line to $results
calls_run() {
  local round="$1" m="$2" c="$3" t="$4" samples="$work/samples/$2.c$3.$4.r$1" line rc=0
  [[ "$t" == vigil || "$t" == haproxy ]] && fresh_kubeconfig "$rdir"
  line="$("$kube_load" run --kubeconfig "$(kubeconfig_of "$t")" --namespace "$NAMESPACE" --op "$m" \
    --concurrency "$c" --seconds "$DURATION" --warmup "$WARMUP" --samples "$samples" --tsv \
    --pid "proxy=$(proxy_pid "$t")" --pid "apiserver=$apiserver_pid" 2>"$samples.err")" || rc=$?
  local calls errors rate p50 p99 vt at ct
  IFS=$'\t' read -r calls errors _ rate p50 p99 vt at ct <<<"$line" || true
  if ((rc != 0)) || [[ -z "$errors" ]] || ((errors != 0 || calls == 0)); then
    show_log "$samples.err"
    [[ "$t" == vigil ]] && show_log "$rdir/vigil.log"
    die "$m through $t with $c callers failed (exit $rc, ${errors:-?} errors, ${calls:-0} calls)"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$m" "$c" "$t" "$rate" "$calls" "$vt" "$at" "$ct" >>"$results"
  log "round $round  $(printf '%-4s c=%-3s %-6s' "$m" "$c" "$t") $(printf '%8s' "$rate")/s  p50 $(awk -v u="$p50" 'BEGIN { printf "%.2f", u / 1000 }') ms  p99 $(awk -v u="$p99" 'BEGIN { printf "%.2f", u / 1000 }') ms"
}

# exec_run ROUND TARGET: one kubectl exec of EXEC_MB MiB to stdout, counted
exec_run() {
  local round="$1" t="$2" out="$work/samples/exec.$2.r$1" t0 t1 b_cpu=0 a_cpu=0 b_api a_api proxy
  [[ "$t" == vigil || "$t" == haproxy ]] && fresh_kubeconfig "$rdir"
  proxy="$(proxy_pid "$t")"
  b_cpu="$(cpu_ticks "/proc/$proxy/stat")" b_api="$(cpu_ticks "/proc/$apiserver_pid/stat")"
  t0="$(now_us)"
  set +e
  kubectl --kubeconfig "$(kubeconfig_of "$t")" exec -n "$VIGIL_DEV_KUBE_NAMESPACE" "$VIGIL_DEV_KUBE_POD" \
    -c "$VIGIL_DEV_KUBE_CONTAINER" -- head -c "${EXEC_MB}M" /dev/zero 2>"$out.err" | wc -c >"$out.bytes"
  local rcs=("${PIPESTATUS[@]}")
  set -e
  t1="$(now_us)"
  a_cpu="$(cpu_ticks "/proc/$proxy/stat")" a_api="$(cpu_ticks "/proc/$apiserver_pid/stat")"
  local bytes
  bytes="$(cat "$out.bytes")"
  if ((rcs[0] != 0)) || [[ "$bytes" != "$((EXEC_MB * 1048576))" ]]; then
    show_log "$out.err"
    [[ "$t" == vigil ]] && show_log "$rdir/vigil.log"
    die "exec through $t failed (kubectl exit ${rcs[0]}, $bytes bytes of $((EXEC_MB * 1048576)))"
  fi
  local mibs
  mibs="$(awk -v mb="$EXEC_MB" -v us="$((t1 - t0))" 'BEGIN { printf "%.1f", mb / (us / 1e6) }')"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" exec - "$t" "$mibs" "$EXEC_MB" \
    "$((a_cpu - b_cpu))" "$((a_api - b_api))" 0 >>"$results"
  log "round $round  exec       $(printf '%-6s' "$t") $(printf '%8s' "$mibs") MiB/s  $(awk -v us="$((t1 - t0))" 'BEGIN { printf "%.2f", us / 1e6 }') s"
}

# ---------------------------------------------------------------------------- rounds
audit_rc=0
verify_lines=()
max_c="$(printf '%s\n' "${CONCURRENCY[@]}" | sort -n | tail -n 1)"
audit_lines_before="$(wc -l <"$VIGIL_DEV_KUBE_AUDIT_LOG" 2>/dev/null || echo 0)"
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
has_target haproxy && start_haproxy
log "$ROUNDS rounds of: ${MEASURES[*]} (DURATION=$DURATION s, CONCURRENCY=${CONCURRENCY[*]}, EXEC_MB=$EXEC_MB), ${TARGETS[*]}"
for ((r = 1; r <= ROUNDS; r++)); do
  rdir="$work/r$r"
  start_vigil "$rdir"
  for t in "${TARGETS[@]}"; do # every path answers
    out="$(kubectl --kubeconfig "$(kubeconfig_of "$t")" --request-timeout 30s -n "$NAMESPACE" get pod pod-000 -o name 2>&1)" \
      || { show_log "$rdir/vigil.log"; die "kubectl get through $t failed: $out"; }
    [[ "$out" == pod/pod-000 ]] || die "kubectl get through $t: unexpected answer: $out"
  done
  mi=0
  for m in "${MEASURES[@]}"; do
    [[ -n "$m" ]] || continue
    if [[ "$m" == exec ]]; then
      read -r -a order <<<"$(rotated $((r + mi)))"
      mi=$((mi + 1))
      for t in "${order[@]}"; do exec_run "$r" "$t"; done
      continue
    fi
    for c in "${CONCURRENCY[@]}"; do
      # rotate which target goes first, per round and per run
      read -r -a order <<<"$(rotated $((r + mi)))"
      mi=$((mi + 1))
      for t in "${order[@]}"; do
        if [[ "$PROFILE" == 1 && "$m" == "$PROFILE_MEASURE" && "$c" == "$max_c" && "$t" == vigil && $r == "$ROUNDS" ]]; then
          perf record -e cpu-clock -g -p "$vigil_pid" -o "$work/perf.data" >"$work/perf.log" 2>&1 &
          perf_pid=$!
          calls_run "$r" "$m" "$c" "$t"
          kill -INT "$perf_pid" 2>/dev/null || true
          wait "$perf_pid" 2>/dev/null || true
          perf_pid=""
        else
          calls_run "$r" "$m" "$c" "$t"
        fi
      done
    done
  done
  # The round's audit log: metrics, a clean stop (stream_end), verify, then drop it.
  verify_round "$rdir"
  audit="$rdir/data/audit"
  ((verify_rc == 0)) || audit_rc=1
  audit_mb="$(du -sm "$audit" 2>/dev/null | cut -f1 || echo 0)"
  verify_lines+=("$(printf 'round %d: exit %d: %s; %s records, audit dir %s MB' "$r" "$verify_rc" \
    "$verify_summary" "${verify_records:-?}" "${audit_mb:-?}")")
  log "${verify_lines[-1]}"
  ((verify_rc == 0)) || show_log "$rdir/verify.txt"
  [[ "$KEEP_WORKDIR" == 1 ]] || rm -rf -- "$audit"
done
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"
audit_lines_after="$(wc -l <"$VIGIL_DEV_KUBE_AUDIT_LOG" 2>/dev/null || echo 0)"

# ---------------------------------------------------------------------------- report
field() { awk -F'\t' -v m="$1" -v c="$2" -v t="$3" -v k="$4" '$2 == m && $3 == c && $4 == t { print $k }' "$results"; }
per_round() { awk -F'\t' -v m="$1" -v c="$2" -v t="$3" '$2 == m && $3 == c && $4 == t { printf "%s%s", sep, int($5 + 0.5); sep = " " }' "$results"; }
clk_tck="$(getconf CLK_TCK)"
# CPU of a process column (7 vigil, 8 apiserver, 9 client) per call over all rounds, in µs
cpu_per() { # measure callers target column
  awk -F'\t' -v m="$1" -v c="$2" -v t="$3" -v k="$4" -v hz="$clk_tck" '$2 == m && $3 == c && $4 == t { s += $k; n += $6 }
    END { if (n > 0) printf "%.0f", s * 1e6 / hz / n; else print "-" }' "$results"
}
pooled_ms() { # measure callers target p
  cat "$work/samples/$1.c$2.$3".r[0-9]* 2>/dev/null | percentile "$4" | awk '{ if ($1 != "") printf "%.2f", $1 / 1000 }'
}

declare -A R
table="$work/table.txt"
goals="$work/goals.txt"
: >"$goals"
row() { printf '%-4s %3s  %-9s %8s  %-17s %5s %5s  %7s %7s  %7s %7s  %7s %7s  %6s %6s %6s\n' "$@"; }
exec_row() { printf '%-4s %6s  %-9s %8s  %-17s %5s %5s  %12s\n' "$@"; }
{
  row call c target "calls/s" "per round" "x dir" "x as" p50 p99 "+p50" "+p99" "+p50 as" "+p99 as" "gw CPU" "API" client
  for m in get list; do
    has_measure "$m" || continue
    for c in "${CONCURRENCY[@]}"; do
      for t in "${TARGETS[@]}"; do
        R[$t]="$(field "$m" "$c" "$t" 5 | median)"
        R[$t.p50]="$(pooled_ms "$m" "$c" "$t" 0.50)" R[$t.p99]="$(pooled_ms "$m" "$c" "$t" 0.99)"
      done
      for t in "${TARGETS[@]}"; do
        as_cols=(- - -)
        if has_target direct-as && [[ "$t" != direct ]]; then
          as_cols=("$(ratio "${R[$t]}" "${R[direct-as]}")" "$(diff_ms "${R[$t.p50]}" "${R[direct-as.p50]}")" "$(diff_ms "${R[$t.p99]}" "${R[direct-as.p99]}")")
        fi
        gw=-
        [[ "$t" == vigil || "$t" == haproxy ]] && gw="$(cpu_per "$m" "$c" "$t" 7)"
        row "$m" "$c" "$t" "$(printf '%.0f' "${R[$t]}")" "$(per_round "$m" "$c" "$t")" \
          "$(ratio "${R[$t]}" "${R[direct]}")" "${as_cols[0]}" "${R[$t.p50]}" "${R[$t.p99]}" \
          "$(diff_ms "${R[$t.p50]}" "${R[direct.p50]}")" "$(diff_ms "${R[$t.p99]}" "${R[direct.p99]}")" \
          "${as_cols[1]}" "${as_cols[2]}" "$gw" "$(cpu_per "$m" "$c" "$t" 8)" "$(cpu_per "$m" "$c" "$t" 9)"
      done
      vd="$(ratio "${R[vigil]}" "${R[direct]}")"
      gw="$(cpu_per "$m" "$c" vigil 7)"
      printf '  %-4s c=%-3s vigil/direct %s (>= %s: %s)   gateway CPU %s us/call (<= %s: %s)   added p50 %s ms, p99 %s ms\n' "$m" "$c" \
        "$vd" "$GOAL_RATIO" "$(verdict "$vd" '>=' "$GOAL_RATIO")" "$gw" "$GOAL_CPU_US" "$(verdict "$gw" '<=' "$GOAL_CPU_US")" \
        "$(diff_ms "${R[vigil.p50]}" "${R[direct.p50]}")" "$(diff_ms "${R[vigil.p99]}" "${R[direct.p99]}")" >>"$goals"
      if has_target haproxy; then
        printf '  %-4s c=%-3s reference: haproxy/direct %s, vigil/haproxy %s; proxy CPU per call: haproxy %s us, vigil %s us (%s x)\n' "$m" "$c" \
          "$(ratio "${R[haproxy]}" "${R[direct]}")" "$(ratio "${R[vigil]}" "${R[haproxy]}")" "$(cpu_per "$m" "$c" haproxy 7)" "$gw" \
          "$(ratio "$gw" "$(cpu_per "$m" "$c" haproxy 7)")" >>"$goals"
      fi
    done
  done
  if has_measure exec; then
    echo
    exec_row exec MiB target "MiB/s" "per round" "x dir" "x as" "gw CPU"
    for t in "${TARGETS[@]}"; do R[exec.$t]="$(field exec - "$t" 5 | median)"; done
    for t in "${TARGETS[@]}"; do
      xas=-
      has_target direct-as && [[ "$t" != direct ]] && xas="$(ratio "${R[exec.$t]}" "${R[exec.direct-as]}")"
      gw=-
      [[ "$t" == vigil || "$t" == haproxy ]] && gw="$(awk -F'\t' -v hz="$clk_tck" -v t="$t" '$2 == "exec" && $4 == t { s += $7; n += $6 } END { if (n) printf "%.2f ms/MiB", s * 1000 / hz / n; else print "-" }' "$results")"
      exec_row exec "$EXEC_MB" "$t" "${R[exec.$t]}" "$(per_round exec - "$t")" \
        "$(ratio "${R[exec.$t]}" "${R[exec.direct]}")" "$xas" "$gw"
    done
    printf '  exec vigil/direct %s MiB/s (no goal)\n' "$(ratio "${R[exec.vigil]}" "${R[exec.direct]}")" >>"$goals"
  fi
} >"$table"

echo
echo "== Vigil Kubernetes gateway vs direct: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)), load before $load_before, after $load_after"
echo "   $ROUNDS rounds, the order of the targets rotating. get/list: kube-rs (kube $(sed -n '/^name = "kube"$/{n;s/^version = "\(.*\)"/\1/p}' "$repo/Cargo.lock"), rustls) Api<Pod>::get of one Pod"
echo "   ($get_bytes bytes of JSON) and Api<Pod>::list of $PODS Pods ($list_bytes bytes), c callers on one client, ${DURATION} s measured after ${WARMUP} s of warm-up."
echo "   calls/s: the median of the rounds, then each round; x dir, x as: calls/s against direct, direct-as."
echo "   Latency in ms, p50/p99 over every call of every round; +p50/+p99: added against direct; '+p50 as'/'+p99 as': against direct-as."
echo "   CPU in us per call over all rounds (utime+stime from /proc/PID/stat over the measured window): gw CPU = the proxy"
echo "   (vigil-node, haproxy), API = kube-apiserver, client = kube-load. All share the cores. direct = the admin token (system:masters);"
echo "   direct-as = the gateway's token impersonating agent-ops as Vigil does, without Vigil; vigil = through the gateway;"
if [[ "$HAPROXY_CHECK" == 1 ]]; then
  echo "   haproxy = through HAProxy checking the token (jwt_verify) and impersonating the same way, without audit or policy."
else
  echo "   haproxy = through HAProxy impersonating the same way, WITHOUT checking the token (HAPROXY_CHECK=0), audit or policy."
fi
echo "   exec: kubectl exec $VIGIL_DEV_KUBE_NAMESPACE/$VIGIL_DEV_KUBE_POD -- head -c ${EXEC_MB}M /dev/zero, MiB/s (median, then each round); gw CPU per MiB moved."
echo "   $(kubectl version --client 2>/dev/null | head -n 1); API server $(admin_kubectl version -o json 2>/dev/null | sed -n 's/.*"gitVersion": "\([^"]*\)".*/\1/p' | tail -n 1)"
echo "   vigil $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')$( [[ -n "$(git -C "$repo" status --porcelain -- node proto 2>/dev/null)" ]] && echo ' + local changes'), audit on (sync=$AUDIT_SYNC), a fresh gateway per round"
echo
cat "$table"
echo
echo "Goals (reported, not enforced):"
cat "$goals"
if [[ "$PROFILE" == 1 && -s "$work/perf.data" ]]; then
  echo
  echo "Profile of vigil-node during the last vigil $PROFILE_MEASURE run with $max_c callers (perf record -e cpu-clock; self time, top symbols):"
  { perf report -i "$work/perf.data" --no-children --sort comm,dso,symbol --stdio 2>/dev/null \
      | awk '/^ +[0-9]+\.[0-9]+%/ && n++ < 30 { sub(/ +$/, ""); print substr($0, 1, 150) }'; } || true
fi
echo
echo "Audit log (vigil audit verify --log, per round; deleted after verification unless KEEP_WORKDIR=1):"
printf '  %s\n' "${verify_lines[@]}"
echo "The API server's audit log grew by $((audit_lines_after - audit_lines_before)) events ($VIGIL_DEV_KUBE_AUDIT_LOG)."
[[ "$KEEP_WORKDIR" == 1 ]] && echo "Work dir (kept): $work"

((audit_rc == 0)) || die "an audit log does not verify (see above)"
