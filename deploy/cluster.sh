#!/usr/bin/env bash
# Vigil as a cluster on this machine, without containers: three coordinator members (formed
# into a cluster on first start), three gateway nodes publishing their audit streams to the dev
# Kafka-protocol broker, and HAProxy in front of the nodes' PostgreSQL listeners, each node
# taken out of rotation while its /readyz does not answer 200. HAProxy connects to the nodes
# from its own loopback address (VIGIL_CLUSTER_LB_SOURCE) and tells them each client's address
# in a PROXY protocol v2 header; the nodes believe such a header from that address only
# (node.proxy_protocol_from), so a client connecting to a node directly from 127.0.0.1 is
# recorded with its own address and refused if it sends a header. The target PostgreSQL, the OIDC
# provider and the broker are the dev servers of deploy/dev/servers.sh (started if not running).
#
#   deploy/cluster.sh up       start what is not running (the first time: init the cluster),
#                              wait until HAProxy sees every node up, print the psql command
#   deploy/cluster.sh down     stop what this script started (by PID), keep the state
#   deploy/cluster.sh status   one line per part; exit 3 if any part is down
#   deploy/cluster.sh token CLIENT   an access token of a dev agent (agent-reporting, agent-ops)
#   deploy/cluster.sh id-token LOGIN an ID token of a dev person (alice approves: group dba)
#
# The node and member configurations are the Compose stack's templates
# (deploy/compose/vigil-node.toml, vigil-coordinator.toml), rendered by the image's
# vigil-entrypoint with loopback addresses; the cluster is formed by the image's
# vigil-cluster-init. The members speak TLS (mutual between them): the first `up` makes a CA
# and their certificates with deploy/coordinator-tls.sh in $VIGIL_CLUSTER_DIR/tls, the nodes
# verify the members against it, and the env file sets VIGIL_COORDINATOR_CA for the vigil CLI.
# `up` on a running cluster starts only the parts that are down (a node
# killed by a test comes back with its data directory, and ships what its spool kept).
# `up` with another VIGIL_CLUSTER_NODES than the running cluster's starts the nodes missing,
# restarts the running ones whose configuration changed (their list of peers), gives HAProxy the
# new list of servers and stops the nodes beyond the count (their data directories stay).
# `down` leaves the dev servers running (stop them with deploy/dev/servers.sh stop) and the
# state directory in place (the next `up` finds the same cluster; remove the directory after
# `down` for a new one).
#
# Everything listens on 127.0.0.1. Settings (environment):
#   VIGIL_CLUSTER_LB_SOURCE         the address HAProxy connects to the nodes from, the one the
#                                   nodes take PROXY headers from (default 127.0.0.2; Linux
#                                   routes all of 127.0.0.0/8 to loopback)
#   VIGIL_CLUSTER_DIR               state: configs, data, logs, PIDs (default /tmp/vigil-cluster)
#   VIGIL_CLUSTER_NODES             how many gateway nodes, 1 to 9 (default 3)
#   VIGIL_CLUSTER_PG_PORT           HAProxy, PostgreSQL clients (default 27432)
#   VIGIL_CLUSTER_STATS_PORT        HAProxy's statistics page (default 27404)
#   VIGIL_CLUSTER_COORDINATOR_PORT  member 1's gRPC port; members 2, 3 the next ones (27471)
#   VIGIL_CLUSTER_NODE_PG_PORT      node 1's PostgreSQL listener; nodes 2, 3 … the next (27441)
#   VIGIL_CLUSTER_NODE_ADMIN_PORT   node 1's admin port (/readyz, /metrics); 2, 3 … next (27481)
#   VIGIL_CLUSTER_SSH_PORT          HAProxy, SSH clients (default 27422): the nodes' [ssh]
#                                   listeners in front of the dev sshd as host "web"
#   VIGIL_CLUSTER_NODE_SSH_PORT     node 1's SSH listener; nodes 2, 3 the next (27451)
#   VIGIL_CLUSTER_KUBE_PORT         HAProxy, kubectl (default 27433): the nodes' [kubernetes]
#                                   listeners in front of the dev kube-apiserver as cluster
#                                   "dev", when the dev servers include it (kube.sh install)
#   VIGIL_CLUSTER_NODE_KUBE_PORT    node 1's Kubernetes listener; nodes 2, 3 the next (27461)
#   VIGIL_CLUSTER_TOPIC             the audit topic on the dev broker (default vigil-audit,
#                                   created with 3 partitions if missing)
#   VIGIL_CLUSTER_DATABASE          the target database behind the connection "app" (default app)
#   VIGIL_CLUSTER_CGROUP            a cgroup v2 directory (default: none): each part runs in a
#                                   child cgroup named after it (coordinator-1, node-2, haproxy),
#                                   so a test can cut one part's traffic with iptables' cgroup
#                                   match (chaos/src/partition.rs)
#   VIGIL_CLUSTER_DRAIN_TIMEOUT_SECS  how long a node given SIGTERM lets its sessions go on
#                                   before it ends them (node.drain_timeout_secs; default 20)
#   VIGIL_BIN_DIR                   vigil, vigil-node, vigil-coordinator
#                                   (default ${CARGO_TARGET_DIR:-target}/debug)
#   VIGIL_DEV_DIR and VIGIL_DEV_*_PORT: the dev servers (deploy/dev/servers.sh)
# The defaults stay clear of the dev servers (25xxx) and of a CI set beside them (35xxx).
# After `up`, $VIGIL_CLUSTER_DIR/env holds the cluster's coordinates (`export` lines).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"

log() { printf 'cluster.sh: %s\n' "$*" >&2; }
die() { printf 'cluster.sh: ERROR: %s\n' "$*" >&2; exit 1; }

# A port setting: the variable named $1, or the default $2; a number below 65534 (the ports of
# the second and third member or node are the next ones), else the script stops here.
port_setting() {
  local value="${!1:-$2}"
  if [[ ! "$value" =~ ^[1-9][0-9]{0,4}$ ]] || ((value >= 65534)); then
    die "$1=$value is not a port number"
  fi
  printf '%s\n' "$value"
}

dir="${VIGIL_CLUSTER_DIR:-/tmp/vigil-cluster}"
lb_port="$(port_setting VIGIL_CLUSTER_PG_PORT 27432)"
stats_port="$(port_setting VIGIL_CLUSTER_STATS_PORT 27404)"
coord_port="$(port_setting VIGIL_CLUSTER_COORDINATOR_PORT 27471)"
node_pg_port="$(port_setting VIGIL_CLUSTER_NODE_PG_PORT 27441)"
node_admin_port="$(port_setting VIGIL_CLUSTER_NODE_ADMIN_PORT 27481)"
ssh_lb_port="$(port_setting VIGIL_CLUSTER_SSH_PORT 27422)"
node_ssh_port="$(port_setting VIGIL_CLUSTER_NODE_SSH_PORT 27451)"
kube_lb_port="$(port_setting VIGIL_CLUSTER_KUBE_PORT 27433)"
node_kube_port="$(port_setting VIGIL_CLUSTER_NODE_KUBE_PORT 27461)"
topic="${VIGIL_CLUSTER_TOPIC:-vigil-audit}"
lb_source="${VIGIL_CLUSTER_LB_SOURCE:-127.0.0.2}"
[[ "$lb_source" =~ ^127(\.[0-9]{1,3}){3}$ && "$lb_source" != 127.0.0.1 ]] \
  || die "VIGIL_CLUSTER_LB_SOURCE=$lb_source is not a loopback address other than 127.0.0.1"
database="${VIGIL_CLUSTER_DATABASE:-app}"
drain_timeout="${VIGIL_CLUSTER_DRAIN_TIMEOUT_SECS:-20}"
cgroup="${VIGIL_CLUSTER_CGROUP:-}"
[[ "$drain_timeout" =~ ^[0-9]{1,5}$ ]] || die "VIGIL_CLUSTER_DRAIN_TIMEOUT_SECS=$drain_timeout is not a number of seconds"
bin_dir="${VIGIL_BIN_DIR:-${CARGO_TARGET_DIR:-$root/target}/debug}"
dev_dir="${VIGIL_DEV_DIR:-/tmp/vigil-dev}"
servers_sh="$here/dev/servers.sh"
members=(1 2 3)
node_count="${VIGIL_CLUSTER_NODES:-3}"
[[ "$node_count" =~ ^[1-9]$ ]] || die "VIGIL_CLUSTER_NODES=$node_count is not a number of nodes from 1 to 9"
mapfile -t nodes < <(seq 1 "$node_count")
# Every port the cluster listens on, each once: ranges that run into each other (node 3's
# PostgreSQL port on HAProxy's Kubernetes port, say) would stop HAProxy or a node at start.
all_ports="$(printf '%s\n' "$lb_port" "$stats_port" "$ssh_lb_port" "$kube_lb_port" \
  $((coord_port)) $((coord_port + 1)) $((coord_port + 2))
  for ((i = 0; i < node_count; i++)); do
    printf '%s\n' $((node_pg_port + i)) $((node_admin_port + i)) $((node_ssh_port + i)) $((node_kube_port + i))
  done)"
[[ "$(sort -n <<<"$all_ports" | tail -n 1)" -le 65535 ]] || die "the node port settings leave no room for $node_count nodes"
overlap="$(sort -n <<<"$all_ports" | uniq -d | tr '\n' ' ')"
[[ -z "$overlap" ]] || die "the port settings overlap for $node_count nodes (each of these is set twice): $overlap"

marker="$dir/.vigil-cluster"
token_file="$dir/cluster-token"
tls_dir="$dir/tls"
peer_secret_file="$dir/peer-secret"
env_file="$dir/env"
haproxy_dir="$dir/haproxy"
haproxy_cfg="$haproxy_dir/haproxy.cfg"
# Shared by every node, so that a client the balancer moves sees one host key, one certificate.
ssh_host_key="$dir/ssh/host_ed25519_key"
kube_tls_dir="$dir/kube-tls"
kubeconfig="$dir/kubeconfig"

show_log() {
  if [[ -f "$1" ]]; then
    printf -- '----- last lines of %s -----\n' "$1" >&2
    tail -n 30 "$1" >&2 || true
  fi
}

member_addr() { printf '127.0.0.1:%s' $((coord_port + $1 - 1)); }
node_pg_addr() { printf '127.0.0.1:%s' $((node_pg_port + $1 - 1)); }
node_admin_addr() { printf '127.0.0.1:%s' $((node_admin_port + $1 - 1)); }
node_ssh_addr() { printf '127.0.0.1:%s' $((node_ssh_port + $1 - 1)); }
node_kube_addr() { printf '127.0.0.1:%s' $((node_kube_port + $1 - 1)); }

# Whether the dev servers include the Kubernetes control plane (deploy/dev/kube.sh install).
kube_on() { [[ -n "${VIGIL_DEV_KUBE_URL:-}" ]]; }

# What every node shares (made once): the SSH host key clients see, and the Kubernetes
# listener's certificate, for 127.0.0.1 and localhost, which the printed kubeconfig trusts.
shared_material() {
  if [[ ! -f "$ssh_host_key" ]]; then
    mkdir -p "$(dirname "$ssh_host_key")"
    ssh-keygen -q -t ed25519 -N '' -C vigil-cluster -f "$ssh_host_key" || die "ssh-keygen failed"
  fi
  if kube_on && [[ ! -f "$kube_tls_dir/cert.pem" ]]; then
    mkdir -p "$kube_tls_dir"
    (umask 077; openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
      -subj /CN=vigil-cluster -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
      -keyout "$kube_tls_dir/key.pem" -out "$kube_tls_dir/cert.pem" 2>"$kube_tls_dir/openssl.log") \
      || { show_log "$kube_tls_dir/openssl.log"; die "openssl could not make the Kubernetes listener's certificate"; }
  fi
}

# The [kubernetes] section of node $1, with the dev control plane (the Compose template has
# none: the stack has no API server).
kube_section() {
  kube_on || return 0
  cat <<EOF

[kubernetes]
listen = "$(node_kube_addr "$1")"
tls_cert = "$kube_tls_dir/cert.pem"
tls_key = "$kube_tls_dir/key.pem"

[[kubernetes.clusters]]
name = "dev"
server = "$VIGIL_DEV_KUBE_URL"
ca_file = "$VIGIL_DEV_KUBE_CA"
token = { file = "$VIGIL_DEV_KUBE_GATEWAY_TOKEN_FILE" }
group_prefix = "vigil:"
allow = { client_ids = ["agent-ops", "agent-reporting"], groups = ["dba"] }
EOF
}

# alive = exists, is not a zombie, and its command line names this cluster's directory (a
# recycled PID is someone else's)
proc_alive() {
  local state
  state="$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null)" || return 1
  [[ -n "$state" && "$state" != Z && "$state" != X ]] || return 1
  tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -qF -- "$dir/"
}

# the PID of a part (its directory under $dir) if it runs
part_pid() {
  local pid
  [[ -f "$dir/$1/pid" ]] || return 1
  pid="$(cat "$dir/$1/pid")"
  [[ -n "$pid" ]] && proc_alive "$pid" && printf '%s\n' "$pid"
}

# Starts a part in its own session, stdout and stderr appended to $dir/PART/log; with
# VIGIL_CLUSTER_CGROUP, in the cgroup $VIGIL_CLUSTER_CGROUP/PART from its first instruction (so
# every socket it opens belongs to that cgroup).
start_part() { # part, command...
  local part="$1"; shift
  if [[ -n "$cgroup" ]]; then
    mkdir -p "$cgroup/$part" || die "cannot make the cgroup $cgroup/$part"
    # shellcheck disable=SC2016 # expanded by the inner bash
    setsid bash -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$cgroup/$part" "$@" \
      </dev/null >>"$dir/$part/log" 2>&1 &
  else
    setsid "$@" </dev/null >>"$dir/$part/log" 2>&1 &
  fi
  printf '%s\n' "$!" >"$dir/$part/pid"
}

# Stops parts by their PIDs, all at once: SIGTERM to each (a node drains its sessions, up to
# the drain timeout, and ships its spool, up to 10 s), then SIGKILL to any still running
# after the drain timeout and 15 s more.
stop_parts() { # part...
  local part pid pids=() _ alive
  for part in "$@"; do
    if pid="$(part_pid "$part")"; then
      log "stopping $part (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  for _ in $(seq 1 $(((drain_timeout + 15) * 10))); do
    alive=0
    for pid in "${pids[@]}"; do proc_alive "$pid" && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    if proc_alive "$pid"; then
      log "pid $pid did not exit on SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  for part in "$@"; do rm -f "$dir/$part/pid"; done
}

http_ok() { curl -fsS -m 2 -o /dev/null "$1" 2>/dev/null; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Renders a Compose template (deploy/compose/NAME) with the variables given as NAME=value.
render() { # template, output, NAME=value...
  local template="$1" out="$2"; shift 2
  env "$@" VIGIL_HOSTNAME=cluster VIGIL_CONFIG_TEMPLATE="$root/deploy/compose/$template" \
    VIGIL_CONFIG="$out" "$root/deploy/docker/vigil-entrypoint" true
}

# ---------------------------------------------------------------------------- dev servers
load_dev_env() {
  [[ -f "$dev_dir/env" ]] || return 1
  # shellcheck disable=SC1091
  source "$dev_dir/env"
}

dev_servers_ready() {
  load_dev_env || return 1
  "$VIGIL_PG_BIN/pg_isready" -q -h "$VIGIL_PG_HOST" -p "$VIGIL_PG_PORT" -t 2 \
    && http_ok "$VIGIL_OIDC_ISSUER/.well-known/openid-configuration" \
    && port_open "$VIGIL_KAFKA_PORT"
}

ensure_dev_servers() {
  if dev_servers_ready; then
    log "dev servers up ($dev_dir)"
  else
    log "starting the dev servers (deploy/dev/servers.sh start, state $dev_dir)"
    VIGIL_DEV_DIR="$dev_dir" "$servers_sh" start || die "deploy/dev/servers.sh start failed"
    dev_servers_ready || die "the dev servers do not answer after servers.sh start"
  fi
}

ensure_topic() {
  # `topic list` prints JSON: [{"error_code":0,"name":"TOPIC",…}, …]
  if timeout 20 "$VIGIL_TANSU" topic list --broker "$VIGIL_KAFKA_URL" 2>/dev/null | grep -qF -- "\"name\":\"$topic\""; then
    return 0
  fi
  log "creating topic $topic (3 partitions)"
  timeout 20 "$VIGIL_TANSU" topic create "$topic" --partitions 3 --broker "$VIGIL_KAFKA_URL" >/dev/null \
    || die "tansu topic create $topic failed"
}

# ---------------------------------------------------------------------------- coordinators
member_start() {
  local i="$1" part="coordinator-$1"
  if part_pid "$part" >/dev/null; then return 0; fi
  mkdir -p "$dir/$part"
  render vigil-coordinator.toml "$dir/$part/config.toml" \
    VIGIL_MEMBER_ID="$i" VIGIL_MEMBER_LISTEN="$(member_addr "$i")" \
    VIGIL_ADVERTISE="$(member_addr "$i")" VIGIL_DATA_DIR="$dir/$part/data" \
    VIGIL_OIDC_ISSUER="$VIGIL_OIDC_ISSUER" || die "rendering $part's config failed"
  # The Compose template has no TLS (its members talk on the stack's own network); here they do.
  printf '\n[member.tls]\ncert_file = "%s"\nkey_file = "%s"\nca_file = "%s"\n' \
    "$tls_dir/coordinator-$i.pem" "$tls_dir/coordinator-$i.key" "$tls_dir/ca.pem" \
    >>"$dir/$part/config.toml"
  log "starting $part on $(member_addr "$i")"
  VIGIL_CLUSTER_TOKEN="$(cat "$token_file")" \
    start_part "$part" "$bin_dir/vigil-coordinator" --config "$dir/$part/config.toml"
}

cluster_init() {
  local spec="" i
  for i in "${members[@]}"; do spec+="$i=$(member_addr "$i") "; done
  PATH="$bin_dir:$PATH" VIGIL_COORDINATOR_CA="$tls_dir/ca.pem" VIGIL_CLUSTER_MEMBERS="${spec% }" VIGIL_CLUSTER_TOKEN="$(cat "$token_file")" \
    VIGIL_CLUSTER_INIT_TIMEOUT=60 "$root/deploy/docker/vigil-cluster-init" >"$dir/cluster-init.log" 2>&1 \
    || { show_log "$dir/cluster-init.log"; die "forming the coordinator cluster failed"; }
}

# ---------------------------------------------------------------------------- nodes
node_start() {
  local i="$1" part="node-$1" config="$dir/node-$1/config.toml" endpoints="" peers="" m
  for m in "${members[@]}"; do endpoints+="\"$(member_addr "$m")\", "; done
  for m in "${nodes[@]}"; do peers+="{ id = \"gw-$m\", url = \"http://$(node_admin_addr "$m")\" }, "; done
  mkdir -p "$dir/$part"
  render vigil-node.toml "$config.new" \
    VIGIL_NODE_ID="gw-$i" VIGIL_DATA_DIR="$dir/$part/data" \
    VIGIL_ADMIN_LISTEN="$(node_admin_addr "$i")" VIGIL_OIDC_ISSUER="$VIGIL_OIDC_ISSUER" \
    VIGIL_KAFKA_BROKERS="$VIGIL_KAFKA_BROKERS" VIGIL_KAFKA_TOPIC="$topic" \
    VIGIL_PG_LISTEN="$(node_pg_addr "$i")" VIGIL_PG_HOST="$VIGIL_PG_HOST" \
    VIGIL_PG_PORT="$VIGIL_PG_PORT" VIGIL_PG_DATABASE="$database" \
    VIGIL_PROXY_PROTOCOL_FROM="\"$lb_source\"" \
    VIGIL_COORDINATOR_ENDPOINTS="${endpoints%, }" VIGIL_NODE_PEERS="${peers%, }" \
    VIGIL_DRAIN_TIMEOUT_SECS="$drain_timeout" \
    VIGIL_SSH_LISTEN="$(node_ssh_addr "$i")" VIGIL_SSH_HOST_KEY_FILE="$ssh_host_key" \
    VIGIL_SSHD_ADDR="$VIGIL_DEV_SSHD_ADDR" VIGIL_SSHD_HOST_KEY="$VIGIL_DEV_SSHD_HOST_KEY" \
    VIGIL_SSH_LOGIN="$VIGIL_DEV_SSH_LOGIN" VIGIL_SSH_GATEWAY_KEY_FILE="$VIGIL_DEV_SSH_GATEWAY_KEY" \
    || die "rendering $part's config failed"
  # The node reaches the members over TLS: coordinator.ca_file, after the token in [coordinator].
  sed -i "/^cluster_token = { env = \"VIGIL_CLUSTER_TOKEN\" }\$/a ca_file = \"$tls_dir/ca.pem\"" \
    "$config.new"
  grep -q '^ca_file = ' "$config.new" || die "$part's config has no [coordinator] cluster_token line to add ca_file after"
  kube_section "$i" >>"$config.new"
  if part_pid "$part" >/dev/null; then
    if cmp -s "$config.new" "$config"; then rm -f "$config.new"; return 0; fi
    stop_parts "$part" # another node count: its peers changed
  fi
  mv -f "$config.new" "$config"
  log "starting $part (gw-$i) on $(node_pg_addr "$i"), admin $(node_admin_addr "$i")"
  VIGIL_CLUSTER_TOKEN="$(cat "$token_file")" VIGIL_PG_GATEWAY_PASSWORD="$VIGIL_PG_GATEWAY_PASSWORD" \
    VIGIL_PEER_SECRET="$(cat "$peer_secret_file")" \
    start_part "$part" "$bin_dir/vigil-node" --config "$config"
}

# The nodes this script started that run and are not among the first VIGIL_CLUSTER_NODES (a
# cluster brought up with more nodes before), by part name.
surplus_nodes() {
  local d i
  for d in "$dir"/node-*/; do
    i="${d%/}"; i="${i##*/node-}"
    [[ "$i" =~ ^[0-9]+$ ]] && ((i > node_count)) && part_pid "node-$i" >/dev/null && printf 'node-%s\n' "$i"
  done
  return 0
}

node_ready() { http_ok "http://$(node_admin_addr "$1")/readyz"; }

wait_nodes_ready() {
  local i _
  for i in "${nodes[@]}"; do
    for _ in $(seq 1 300); do
      node_ready "$i" && break
      part_pid "node-$i" >/dev/null || { show_log "$dir/node-$i/log"; die "node-$i exited"; }
      sleep 0.1
    done
    node_ready "$i" || { show_log "$dir/node-$i/log"; die "node-$i is not ready after 30 s"; }
  done
}

# ---------------------------------------------------------------------------- HAProxy
# A frontend on 127.0.0.1:$2 and its backend: every node's listener (address from function
# $3), each checked on its admin port's /readyz, sent a PROXY v2 header from $lb_source.
haproxy_frontend() { # name, port, address function
  local i
  cat <<EOF

frontend $1
    bind 127.0.0.1:$2
    default_backend gateways-$1

backend gateways-$1
    balance leastconn
    option httpchk
    http-check send meth GET uri /readyz
    http-check expect status 200
    default-server inter 500ms fall 2 rise 2
EOF
  for i in "${nodes[@]}"; do
    printf '    server node-%s %s check port %s send-proxy-v2 source %s\n' \
      "$i" "$("$3" "$i")" $((node_admin_port + i - 1)) "$lb_source"
  done
}

haproxy_config() {
  cat <<EOF
# Written by deploy/cluster.sh up: TCP (L4) to every gateway node's PostgreSQL, SSH and
# Kubernetes listeners (one frontend each); a node is out of rotation while its /readyz does not answer 200. A connection refused by a
# node that just died is sent to another one (redispatch), so a client reconnecting at once
# is not refused by the balancer during the checks' interval. Each connection to a node comes
# from $lb_source and starts with a PROXY protocol v2 header naming the client (send-proxy-v2),
# which the nodes believe from that address only (node.proxy_protocol_from); the checks go to
# the admin port without one.
global
    maxconn 4096
    pidfile $haproxy_dir/haproxy.pid

defaults
    mode tcp
    log stdout format raw local0 info
    option tcplog
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    timeout check 1s
    retries 2
    option redispatch 1

EOF
  haproxy_frontend postgres "$lb_port" node_pg_addr
  haproxy_frontend ssh "$ssh_lb_port" node_ssh_addr
  if kube_on; then haproxy_frontend kubernetes "$kube_lb_port" node_kube_addr; fi
  cat <<EOF

listen stats
    mode http
    bind 127.0.0.1:$stats_port
    stats enable
    stats uri /
    stats refresh 5s
EOF
}

haproxy_start() {
  command -v haproxy >/dev/null || die "haproxy not found: run deploy/dev/setup.sh (Debian's haproxy package)"
  mkdir -p "$haproxy_dir"
  haproxy_config >"$haproxy_cfg.tmp"
  if part_pid haproxy >/dev/null; then
    if cmp -s "$haproxy_cfg.tmp" "$haproxy_cfg"; then rm -f "$haproxy_cfg.tmp"; return 0; fi
    stop_parts haproxy  # the ports changed: start it again with the new config
  fi
  mv -f "$haproxy_cfg.tmp" "$haproxy_cfg"
  haproxy -c -q -f "$haproxy_cfg" >"$haproxy_dir/check.log" 2>&1 \
    || { show_log "$haproxy_dir/check.log"; die "haproxy -c rejects $haproxy_cfg"; }
  log "starting HAProxy on 127.0.0.1:$lb_port (statistics: http://127.0.0.1:$stats_port/)"
  # -W: master-worker, the recorded PID is the master's; -db: in the foreground, logs to $dir/haproxy/log
  start_part haproxy haproxy -W -db -f "$haproxy_cfg"
}

# how many nodes HAProxy sees UP (its statistics as CSV: field 18 is the status)
haproxy_up_count() {
  curl -fsS -m 2 "http://127.0.0.1:$stats_port/;csv" 2>/dev/null \
    | awk -F, '$1 == "gateways-postgres" && $2 ~ /^node-/ && $18 == "UP" { n++ } END { print n + 0 }'
}

wait_haproxy_up() {
  local _ pid
  for _ in $(seq 1 200); do
    (($(haproxy_up_count) == ${#nodes[@]})) && return 0
    if ! part_pid haproxy >/dev/null; then
      # HAProxy has looked gone right after "Loading success", with nothing in its log (CI, t53
      # and t56). A second look tells a moment's misreading (the master executing itself again,
      # as HAProxy 2.5 and later does to enter wait mode) from an exit; the message says what
      # /proc held.
      sleep 0.5
      if ! part_pid haproxy >/dev/null; then
        show_log "$dir/haproxy/log"
        pid="$(cat "$dir/haproxy/pid" 2>/dev/null)"
        die "HAProxy exited (pid ${pid:-?}: $(head -c 300 "/proc/$pid/status" 2>/dev/null | tr '\n' ' ' || echo gone); its command line: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null))"
      fi
    fi
    sleep 0.1
  done
  show_log "$dir/haproxy/log"
  die "HAProxy does not see every node up after 20 s"
}

# ---------------------------------------------------------------------------- commands
token() { # client id
  load_dev_env || die "no $dev_dir/env: start the dev servers (deploy/dev/servers.sh start)"
  "$VIGIL_NODE" "$VIGIL_OIDC_DIR/token.mjs" --issuer "$VIGIL_OIDC_ISSUER" --client "$1" --secret "$1-secret"
}

id_token() { # login of a person
  load_dev_env || die "no $dev_dir/env: start the dev servers (deploy/dev/servers.sh start)"
  "$VIGIL_NODE" "$VIGIL_OIDC_DIR/id-token.mjs" --issuer "$VIGIL_OIDC_ISSUER" --user "$1"
}

# What the printed ssh and kubectl commands use: the nodes' shared SSH host key as known for
# the balancer's port, and a kubeconfig for the balancer trusting the shared certificate.
write_client_files() {
  printf '[127.0.0.1]:%s %s\n' "$ssh_lb_port" "$(cut -d' ' -f1,2 "$ssh_host_key.pub")" \
    >"$dir/ssh/known_hosts"
  kube_on || return 0
  cat >"$kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: vigil-cluster
  cluster:
    server: https://127.0.0.1:$kube_lb_port/clusters/dev
    certificate-authority: $kube_tls_dir/cert.pem
contexts:
- name: vigil-cluster
  context: {cluster: vigil-cluster}
current-context: vigil-cluster
EOF
}

write_env() {
  local i
  (umask 077
   {
     printf '# Written by deploy/cluster.sh up; source it: . %q\n' "$env_file"
     printf 'export %s=%q\n' \
       VIGIL_CLUSTER_DIR "$dir" \
       VIGIL_CLUSTER_PG_ADDR "127.0.0.1:$lb_port" \
       VIGIL_CLUSTER_SSH_ADDR "127.0.0.1:$ssh_lb_port" \
       VIGIL_CLUSTER_SSH_KNOWN_HOSTS "$dir/ssh/known_hosts" \
       VIGIL_CLUSTER_LB_SOURCE "$lb_source" \
       VIGIL_CLUSTER_STATS_URL "http://127.0.0.1:$stats_port/" \
       VIGIL_CLUSTER_TOPIC "$topic" \
       VIGIL_CLUSTER_DATABASE "$database" \
       VIGIL_CLUSTER_NODES "$node_count" \
       VIGIL_CLUSTER_KAFKA_BROKERS "$VIGIL_KAFKA_BROKERS" \
       VIGIL_CLUSTER_TOKEN_FILE "$token_file" \
       VIGIL_COORDINATOR_CA "$tls_dir/ca.pem" \
       VIGIL_COORDINATOR "$(for i in "${members[@]}"; do printf '%s,' "$(member_addr "$i")"; done | sed 's/,$//')"
     for i in "${nodes[@]}"; do
       printf 'export VIGIL_CLUSTER_NODE%s_PID_FILE=%q\n' "$i" "$dir/node-$i/pid"
       printf 'export VIGIL_CLUSTER_NODE%s_AUDIT_DIR=%q\n' "$i" "$dir/node-$i/data/audit"
       printf 'export VIGIL_CLUSTER_NODE%s_ADMIN=%q\n' "$i" "$(node_admin_addr "$i")"
     done
     if kube_on; then
       printf 'export %s=%q\n' VIGIL_CLUSTER_KUBE_ADDR "127.0.0.1:$kube_lb_port" \
         VIGIL_CLUSTER_KUBECONFIG "$kubeconfig"
     fi
   } >"$env_file.tmp")
  mv -f "$env_file.tmp" "$env_file"
}

cmd_up() {
  local b
  for b in vigil vigil-node vigil-coordinator; do
    [[ -x "$bin_dir/$b" ]] || die "$bin_dir/$b not found: cargo build --bins (or set VIGIL_BIN_DIR)"
  done
  command -v haproxy >/dev/null || die "haproxy not found: run deploy/dev/setup.sh (Debian's haproxy package)"
  if [[ ! -d "$dir" ]] || [[ -z "$(ls -A "$dir")" ]]; then
    mkdir -p "$dir"
    touch "$marker"
  fi
  [[ -f "$marker" ]] || die "$dir was not created by cluster.sh (no $marker); choose another VIGIL_CLUSTER_DIR"
  [[ -f "$token_file" ]] || (umask 077; openssl rand -hex 32 >"$token_file")
  if [[ ! -f "$tls_dir/ca.pem" ]]; then
    local certs=() m
    for m in "${members[@]}"; do certs+=("coordinator-$m=IP:127.0.0.1,DNS:localhost"); done
    "$here/coordinator-tls.sh" "$tls_dir" "${certs[@]}" || die "deploy/coordinator-tls.sh failed"
  fi
  [[ -f "$peer_secret_file" ]] || (umask 077; openssl rand -hex 32 >"$peer_secret_file")

  ensure_dev_servers
  ensure_topic
  local i
  for i in "${members[@]}"; do member_start "$i"; done
  cluster_init
  shared_material
  write_client_files
  for i in "${nodes[@]}"; do node_start "$i"; done
  wait_nodes_ready
  haproxy_start
  wait_haproxy_up
  local surplus
  mapfile -t surplus < <(surplus_nodes)
  ((${#surplus[@]} == 0)) || stop_parts "${surplus[@]}"
  write_env
  log "cluster up; coordinates in $env_file"
  cat <<EOF
psql through HAProxy (an agent's access token from the dev provider as the password):
  psql "host=127.0.0.1 port=$lb_port dbname=app user=agent sslmode=require password=\$($0 token agent-reporting)"
held writes (to customers), approved by the person alice (group dba; an agent's token is not
taken by the coordinator members) against the coordinator cluster:
  . $env_file; export VIGIL_TOKEN=\$($0 id-token alice)
  $bin_dir/vigil approvals list --state pending
ssh through HAProxy to host "web" (the dev sshd) as $VIGIL_DEV_SSH_LOGIN; answer the prompt with
the token of \`$0 token agent-ops\`:
  ssh -p $ssh_lb_port -o PreferredAuthentications=keyboard-interactive -o UserKnownHostsFile=$dir/ssh/known_hosts $VIGIL_DEV_SSH_LOGIN+web@127.0.0.1 hostname
EOF
  if kube_on; then
    cat <<EOF
kubectl through HAProxy to cluster "dev" (the dev kube-apiserver), as agent-ops:
  kubectl --kubeconfig $kubeconfig --token "\$($0 token agent-ops)" get pods -A
EOF
  fi
}

cmd_down() {
  [[ -d "$dir" ]] || { log "$dir does not exist: nothing to stop"; return 0; }
  local i parts=()
  stop_parts haproxy
  for i in "${nodes[@]}"; do parts+=("node-$i"); done
  mapfile -t -O "${#parts[@]}" parts < <(surplus_nodes)
  stop_parts "${parts[@]}"
  parts=()
  for i in "${members[@]}"; do parts+=("coordinator-$i"); done
  stop_parts "${parts[@]}"
  log "stopped (state kept in $dir; the dev servers keep running)"
}

cmd_status() {
  local rc=0 i pid
  for i in "${members[@]}"; do
    if pid="$(part_pid "coordinator-$i")"; then
      printf 'coordinator-%s  running  pid %s  %s\n' "$i" "$pid" "$(member_addr "$i")"
    else
      printf 'coordinator-%s  stopped\n' "$i"; rc=3
    fi
  done
  for i in "${nodes[@]}"; do
    if pid="$(part_pid "node-$i")" && node_ready "$i"; then
      printf 'node-%s         ready    pid %s  postgres %s  admin %s\n' "$i" "$pid" "$(node_pg_addr "$i")" "$(node_admin_addr "$i")"
    elif pid="$(part_pid "node-$i")"; then
      printf 'node-%s         unready  pid %s  admin %s\n' "$i" "$pid" "$(node_admin_addr "$i")"; rc=3
    else
      printf 'node-%s         stopped\n' "$i"; rc=3
    fi
  done
  if pid="$(part_pid haproxy)"; then
    printf 'haproxy        running  pid %s  127.0.0.1:%s  %s of %s nodes up\n' "$pid" "$lb_port" "$(haproxy_up_count)" "${#nodes[@]}"
  else
    printf 'haproxy        stopped\n'; rc=3
  fi
  if dev_servers_ready; then
    printf 'dev servers    running  postgres %s:%s  oidc %s  kafka %s topic %s\n' \
      "$VIGIL_PG_HOST" "$VIGIL_PG_PORT" "$VIGIL_OIDC_ISSUER" "$VIGIL_KAFKA_BROKERS" "$topic"
  else
    printf 'dev servers    down     (deploy/dev/servers.sh start, VIGIL_DEV_DIR=%s)\n' "$dev_dir"; rc=3
  fi
  return "$rc"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  token) token "${2:?usage: $0 token CLIENT_ID}" ;;
  id-token) id_token "${2:?usage: $0 id-token LOGIN}" ;;
  *) printf 'usage: %s up|down|status|token CLIENT|id-token LOGIN\n' "$0" >&2; exit 2 ;;
esac
