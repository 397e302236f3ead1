#!/usr/bin/env bash
# pgbench -S through HAProxy in front of 1, 2 and 3 gateway nodes (the local cluster of
# deploy/cluster.sh: three coordinator members over TLS, nodes with the Kafka sink), side by
# side with direct PostgreSQL in one run: the cost of the balancer hop, and each node's CPU per
# statement as nodes are added.
#
#   loadtest/cluster.sh                      # NODES="1 2 3", 2 rounds x 10 s per target
#   DURATION=5 ROUNDS=1 loadtest/cluster.sh  # quick pass
#
# For each node count it brings the cluster to that many nodes (VIGIL_CLUSTER_NODES=N
# deploy/cluster.sh up, in a temporary state directory, on ports of its own and a fresh topic of
# the dev broker) and runs pgbench -S (select-only, held connections) interleaved over the
# targets of that step:
#   direct  pgbench -> PostgreSQL (sslmode=require): the baseline of "x direct"
#   node    pgbench -> node 1 without the balancer (first step only): with `lb`, the hop's cost
#   lb      pgbench -> HAProxy -> the N nodes (leastconn, PROXY v2 headers)
# Around every run it samples utime+stime (/proc/PID/stat) of every vigil-node, of HAProxy (its
# master and workers) and of the broker, and each node's statement and record counters (its
# /metrics), and prints per step and target: TPS, the ratio to direct, the nodes' CPU per
# transaction (all nodes' CPU / transactions) and per statement on each node, HAProxy's and the
# broker's CPU per transaction, audit records per statement, and the nodes' spool after the run.
# At the end the cluster stops cleanly (every node writes stream_end and ships its spool) and
# the topic is verified with `vigil audit verify --kafka`: it must hold every node's local log.
# It reports only (no goal changes the exit status); a failed pgbench run, a failed start or a
# topic that does not verify exits 1. Everything it started is stopped on exit.
#
# The machine's cores are shared by pgbench, HAProxy, the nodes, PostgreSQL and the broker: on a
# 2-core machine total TPS cannot grow with nodes (see docs/capacity.md); what this shows is the
# CPU each part spends per statement, which is what a capacity plan needs.
#
# Settings (environment):
#   NODES="1 2 3"        node counts, one step each (1 to 9)
#   DURATION=10          seconds per pgbench run
#   ROUNDS=2             interleaved rounds per step; the table shows the median TPS
#   CLIENTS=8 THREADS=2  pgbench -c / -j
#   WARMUP=3             seconds of unlogged warm-up per target at each step (0: none)
#   IDLE=5               seconds without load at each step, after the warm-up: every process's
#                        CPU then is its fixed cost (timers, checks, checkpoints, the producer)
#   MODES="simple"       pgbench -M: simple, extended, prepared
#   CLUSTER_PORT_BASE=33400  the cluster's ports: HAProxy +32 (SSH +22, Kubernetes +33), its
#                        statistics +4, members +71.., nodes' PostgreSQL +41.., SSH +51..,
#                        Kubernetes +61.., admin +81.. (deploy/cluster.sh's layout)
#   VIGIL_DEV_DIR=/tmp/vigil-dev   dev servers' state dir (servers.sh)
#   CARGO_TARGET_DIR=/var/cache/vigil/target   SKIP_BUILD=1 uses the release binaries there
#   KEEP_WORKDIR=1       keep the temporary directory (cluster state, logs, audit logs) and topic
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

read -r -a NODES <<<"${NODES:-1 2 3}"
DURATION="${DURATION:-10}"
ROUNDS="${ROUNDS:-2}"
CLIENTS="${CLIENTS:-8}"
THREADS="${THREADS:-2}"
WARMUP="${WARMUP:-3}"
IDLE="${IDLE:-5}"
read -r -a MODES <<<"${MODES:-simple}"
CLUSTER_PORT_BASE="${CLUSTER_PORT_BASE:-33400}"

script=cluster.sh
# shellcheck source=loadtest/lib.sh
source "$here/lib.sh" # the common settings (dev_dir, target_dir, SKIP_BUILD, KEEP_WORKDIR); log, die, ratio, median …

for v in DURATION ROUNDS CLIENTS THREADS WARMUP IDLE CLUSTER_PORT_BASE; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a whole number (got '${!v}')"
done
((DURATION > 0 && ROUNDS > 0 && CLIENTS > 0 && THREADS > 0)) || die "DURATION, ROUNDS, CLIENTS, THREADS must be > 0"
((CLUSTER_PORT_BASE >= 1024 && CLUSTER_PORT_BASE <= 65400)) || die "CLUSTER_PORT_BASE must be from 1024 to 65400"
((${#NODES[@]} > 0)) || die "NODES is empty"
for n in "${NODES[@]}"; do [[ "$n" =~ ^[1-9]$ ]] || die "NODES: '$n' is not a node count from 1 to 9"; done
for m in "${MODES[@]}"; do
  case "$m" in simple | extended | prepared) ;; *) die "unknown mode '$m'" ;; esac
done

# deploy/cluster.sh's settings: its own directory (set below), ports and topic.
export VIGIL_CLUSTER_PG_PORT=$((CLUSTER_PORT_BASE + 32)) VIGIL_CLUSTER_STATS_PORT=$((CLUSTER_PORT_BASE + 4))
export VIGIL_CLUSTER_COORDINATOR_PORT=$((CLUSTER_PORT_BASE + 71)) VIGIL_CLUSTER_NODE_PG_PORT=$((CLUSTER_PORT_BASE + 41))
export VIGIL_CLUSTER_NODE_ADMIN_PORT=$((CLUSTER_PORT_BASE + 81)) VIGIL_DEV_DIR="$dev_dir"
# The nodes' SSH and Kubernetes listeners and HAProxy's frontends for them: not measured, but
# deploy/cluster.sh starts them; kept off its default ports.
export VIGIL_CLUSTER_SSH_PORT=$((CLUSTER_PORT_BASE + 22)) VIGIL_CLUSTER_NODE_SSH_PORT=$((CLUSTER_PORT_BASE + 51))
export VIGIL_CLUSTER_KUBE_PORT=$((CLUSTER_PORT_BASE + 33)) VIGIL_CLUSTER_NODE_KUBE_PORT=$((CLUSTER_PORT_BASE + 61))
export VIGIL_CLUSTER_DATABASE=bench # the connection "app" of the nodes: the dev server's pgbench database
cluster_sh="$repo/deploy/cluster.sh"
max_nodes="$(printf '%s\n' "${NODES[@]}" | sort -n | tail -n 1)"
ports=(VIGIL_CLUSTER_PG_PORT VIGIL_CLUSTER_STATS_PORT VIGIL_CLUSTER_SSH_PORT VIGIL_CLUSTER_KUBE_PORT)
for ((i = 0; i < 3; i++)); do
  declare "member_port_$i=$((VIGIL_CLUSTER_COORDINATOR_PORT + i))"; ports+=("member_port_$i")
done
for ((i = 0; i < max_nodes; i++)); do
  declare "node_port_$i=$((VIGIL_CLUSTER_NODE_PG_PORT + i))" "admin_port_$i=$((VIGIL_CLUSTER_NODE_ADMIN_PORT + i))" \
    "ssh_port_$i=$((VIGIL_CLUSTER_NODE_SSH_PORT + i))" "kube_port_$i=$((VIGIL_CLUSTER_NODE_KUBE_PORT + i))"
  ports+=("node_port_$i" "admin_port_$i" "ssh_port_$i" "kube_port_$i")
done

# ---------------------------------------------------------------------------- cleanup
work=""
cluster_up=0
topic=""
started_servers=0

cleanup() {
  local rc=$?
  set +e
  ((cluster_up)) && "$cluster_sh" down >>"$work/cluster-sh.log" 2>&1
  delete_topic "$topic"
  finish "$rc"
}
trap_cleanup

# ---------------------------------------------------------------------------- prerequisites
pg_bin=/usr/lib/postgresql/15/bin
if [[ ! -x "$pg_bin/pgbench" ]] || ! command -v haproxy >/dev/null; then
  die "pgbench or haproxy missing: run deploy/dev/setup.sh"
fi
ports_free "${ports[@]}"
use_dev_servers postgresql oidc kafka sshd # cluster.sh's nodes front the dev sshd too
pg_bin="${VIGIL_PG_BIN:-$pg_bin}"
node_bin="${VIGIL_NODE:-$(command -v node || true)}"
[[ -x "$node_bin" ]] || die "Node.js not found (VIGIL_NODE); run deploy/dev/setup.sh"
broker_pid="$(VIGIL_DEV_DIR="$dev_dir" "$repo/deploy/dev/servers.sh" status 2>/dev/null | sed -n 's/^kafka  *running  *pid \([0-9]*\) .*/\1/p')"
[[ -n "$broker_pid" ]] || die "no PID of the dev Kafka broker in deploy/dev/servers.sh status"

if [[ "$SKIP_BUILD" != 1 ]]; then
  log "building the release binaries (CARGO_TARGET_DIR=$target_dir; may wait for another build's lock)"
  (cd "$repo" && CARGO_TARGET_DIR="$target_dir" cargo build --release -p vigil-node -p vigil-cli -p vigil-coordinator-server --bins) \
    || die "cargo build failed"
fi
export VIGIL_BIN_DIR="$target_dir/release"
vigil_cli="$VIGIL_BIN_DIR/vigil"
for b in vigil vigil-node vigil-coordinator; do
  [[ -x "$VIGIL_BIN_DIR/$b" ]] || die "$VIGIL_BIN_DIR/$b missing (build first, or unset SKIP_BUILD)"
done

# Disk: every node writes its audit log (~2 records of ~850 bytes per statement, at up to ~15k
# statements/s here) and the target logs every statement; the broker keeps the topic in memory.
lb_runs=$(((ROUNDS * ${#MODES[@]} + 1) * ${#NODES[@]}))
need_mb=$((DURATION * (lb_runs + ROUNDS * ${#MODES[@]}) * 30 + 2048))
free_mb="$(df -Pm /tmp | awk 'NR == 2 { print $4 }')"
((free_mb >= need_mb)) || die "about ${need_mb} MB of disk needed in /tmp (audit logs, the target's statement log), ${free_mb} MB free; free some, or lower DURATION/ROUNDS/NODES"

work="$(mktemp -d /tmp/vigil-capacity.XXXXXX)"
export VIGIL_CLUSTER_DIR="$work/cluster"
topic="vigil-capacity-$(date -u +%Y%m%d%H%M%S)-$$" # cluster.sh creates it (3 partitions); cleanup deletes it
export VIGIL_CLUSTER_TOPIC="$topic"
mkdir -p "$work/runs"
results="$work/results.tsv"
idle_results="$work/idle.tsv"
: >"$results"
: >"$idle_results"

# ---------------------------------------------------------------------------- sampling
clk_tck="$(getconf CLK_TCK)"
node_pid() { cat "$VIGIL_CLUSTER_DIR/node-$1/pid"; }
# HAProxy runs master-worker: the master's PID file, the workers its children (their CPU is
# not in the master's utime/stime until they exit).
haproxy_ticks() {
  local master t=0 p
  master="$(cat "$VIGIL_CLUSTER_DIR/haproxy/pid")"
  for p in "$master" $(cat /proc/"$master"/task/*/children 2>/dev/null); do
    t=$((t + $(cpu_ticks "/proc/$p/stat")))
  done
  printf '%s\n' "$t"
}
# a counter of node $1's /metrics: the sum of every series of the metric $2
node_metric() {
  curl -fsS -m 5 "http://127.0.0.1:$((VIGIL_CLUSTER_NODE_ADMIN_PORT + $1 - 1))/metrics" 2>/dev/null \
    | awk -v m="$2" '$1 == m || index($1, m "{") == 1 { s += $2 } END { printf "%.0f\n", s }'
}
# "haproxy_ticks broker_ticks node1_ticks,node1_statements,node1_records ..." for N nodes
sample() {
  local i line
  line="$(haproxy_ticks) $(cpu_ticks "/proc/$broker_pid/stat")"
  for ((i = 1; i <= $1; i++)); do
    line+=" $(cpu_ticks "/proc/$(node_pid "$i")/stat"),$(node_metric "$i" vigil_statements_total),$(node_metric "$i" vigil_audit_records_total)"
  done
  printf '%s\n' "$line"
}

# Sets conn_env for a target.
target_env() {
  case "$1" in
    direct) conn_env=(PGHOST="$VIGIL_PG_HOST" PGPORT="$VIGIL_PG_PORT" PGSSLMODE=require PGDATABASE=bench
                      PGUSER="$VIGIL_PG_GATEWAY_USER" PGPASSWORD="$VIGIL_PG_GATEWAY_PASSWORD") ;;
    node | lb) fresh_token
               conn_env=(PGHOST=127.0.0.1 PGSSLMODE=require PGDATABASE=app PGUSER=agent PGPASSWORD="$token")
               if [[ "$1" == node ]]; then conn_env+=(PGPORT="$VIGIL_CLUSTER_NODE_PG_PORT"); else conn_env+=(PGPORT="$VIGIL_CLUSTER_PG_PORT"); fi ;;
  esac
  conn_env+=(PGCONNECT_TIMEOUT=10)
}

# idle N: samples the N nodes, HAProxy and the broker over IDLE seconds without load; appends
# "N idle SECONDS before after" to $idle_results
idle() {
  local before after
  ((IDLE > 0)) || return 0
  before="$(sample "$1")"
  sleep "$IDLE"
  after="$(sample "$1")"
  printf '%s\t%s\t%s\t%s\n' "$1" "$IDLE" "$before" "$after" >>"$idle_results"
}

# run_one N ROUND TARGET MODE SECONDS: one pgbench run with N nodes up; appends a line to
# $results unless ROUND is w (warm-up)
run_one() {
  local n="$1" round="$2" t="$3" mode="$4" secs="$5" before after spool=0 i
  local prefix="$work/runs/n$n.$t.$mode.r$round" tps lat txns
  target_env "$t"
  before="$(sample "$n")"
  if ! (cd "$work/runs" && env "${conn_env[@]}" "$pg_bin/pgbench" -n -S -M "$mode" -c "$CLIENTS" -j "$THREADS" \
        -T "$secs" >"$prefix.out" 2>&1); then
    show_log "$prefix.out"
    for ((i = 1; i <= n; i++)); do show_log "$VIGIL_CLUSTER_DIR/node-$i/log" 10; done
    die "pgbench failed against $t with $n nodes ($mode)"
  fi
  after="$(sample "$n")"
  pgbench_result "$prefix.out" "$t, $n nodes, $mode"
  for ((i = 1; i <= n; i++)); do spool=$((spool + $(node_metric "$i" vigil_audit_spool_records))); done
  [[ "$round" == w ]] && return 0
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$n" "$round" "$t" "$mode" "$tps" "$lat" "$txns" \
    "$before" "$after" "$spool" >>"$results"
  log "$n nodes, round $round  $(printf '%-7s %-8s' "$t" "$mode") tps $tps  lat avg $lat ms  spool after $spool records"
}

# ---------------------------------------------------------------------------- the steps
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
log "work dir $work; topic $topic; ${#NODES[@]} steps (${NODES[*]} nodes) x $ROUNDS rounds x ${#MODES[@]} modes of ${DURATION}s, -c $CLIENTS -j $THREADS"
for n in "${NODES[@]}"; do
  log "bringing the cluster to $n nodes (deploy/cluster.sh up, log in $work/cluster-sh.log)"
  cluster_up=1
  VIGIL_CLUSTER_NODES="$n" "$cluster_sh" up >>"$work/cluster-sh.log" 2>&1 \
    || { show_log "$work/cluster-sh.log"; die "deploy/cluster.sh up with $n nodes failed"; }
  targets=(direct lb)
  ((n == 1)) && targets=(direct node lb)
  if ((WARMUP > 0)); then
    for t in "${targets[@]}"; do run_one "$n" w "$t" "${MODES[0]}" "$WARMUP"; done
  fi
  idle "$n"
  for ((r = 1; r <= ROUNDS; r++)); do
    for mode in "${MODES[@]}"; do
      # rotate the order each round so no target always runs first
      for ((i = 0; i < ${#targets[@]}; i++)); do
        run_one "$n" "$r" "${targets[(i + r - 1) % ${#targets[@]}]}" "$mode" "$DURATION"
      done
    done
  done
done
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------------------- the topic
log "stopping the cluster (every node writes stream_end and ships its spool), then verifying topic $topic"
"$cluster_sh" down >>"$work/cluster-sh.log" 2>&1 || { show_log "$work/cluster-sh.log"; die "deploy/cluster.sh down failed"; }
cluster_up=0
verify_topic "$topic" "$work/verify.txt" "$VIGIL_CLUSTER_DIR"/node-*/data/audit

# ---------------------------------------------------------------------------- report
# One line per step, target and mode: the medians and sums over its rounds; then each step's
# idle CPU. "net" subtracts the nodes' idle CPU over the runs' seconds from their CPU.
report() {
  awk -F'\t' -v hz="$clk_tck" -v secs="$DURATION" '
    function med(list,   n, a, i, j, t) { n = split(list, a, " ")
      for (i = 2; i <= n; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
      return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
    function us(ticks, count) { return count > 0 ? sprintf("%.1f", ticks * 1e6 / hz / count) : "-" }
    # the deltas between two samples ($before, $after) into d[1] (HAProxy), d[2] (broker) and
    # per node dt[i], ds[i], dr[i] (CPU ticks, statements, records); returns the node count
    function deltas(before, after,   nb, b, a, i, bv, av) {
      nb = split(before, b, " "); split(after, a, " ")
      d[1] = a[1] - b[1]; d[2] = a[2] - b[2]
      for (i = 3; i <= nb; i++) {
        split(b[i], bv, ","); split(a[i], av, ",")
        dt[i - 2] = av[1] - bv[1]; ds[i - 2] = av[2] - bv[2]; dr[i - 2] = av[3] - bv[3]
      }
      return nb - 2
    }
    FILENAME == ARGV[1] { # the idle samples: N, seconds, before, after
      n = deltas($3, $4); ih[$1] = d[1] / $2; ib[$1] = d[2] / $2; idle_steps[++ni] = $1
      for (i = 1; i <= n; i++) irate[$1, i] = dt[i] / $2
      inodes[$1] = n
      next
    }
    {
      k = $1 SUBSEP $3 SUBSEP $4
      if (!(k in seen)) { seen[k] = 1; order[++nk] = k }
      tps[k] = tps[k] " " $5; per[k] = per[k] sprintf("%s%.0f", (per[k] == "" ? "" : " "), $5)
      lat[k] = lat[k] " " $6; tx[k] += $7; spool[k] = $10; runs[k]++
      n = deltas($8, $9); ha[k] += d[1]; br[k] += d[2]; nodes[k] = n
      for (i = 1; i <= n; i++) { nt[k, i] += dt[i]; ns[k, i] += ds[i]; nr[k, i] += dr[i] }
    }
    END {
      for (o = 1; o <= nk; o++) {
        k = order[o]; split(k, f, SUBSEP)
        if (f[2] == "direct") direct[f[1], f[3]] = med(tps[k])
      }
      printf "%-5s %-7s %-8s %8s  %-14s %6s %7s %8s %7s  %-22s %7s %7s %6s %6s\n", "nodes", "target", "mode", "TPS med", "per round",
        "x dir", "lat ms", "nodes us", "net us", "us/stmt on each node", "HAProxy", "broker", "rec/st", "spool"
      for (o = 1; o <= nk; o++) {
        k = order[o]; split(k, f, SUBSEP); t = med(tps[k])
        if (f[2] == "direct") {
          printf "%-5s %-7s %-8s %8.0f  %-14s %6s %7.3f %8s %7s  %-22s %7s %7s %6s %6s\n", f[1], f[2], f[3], t, per[k], "1.00", med(lat[k]), "-", "-", "-", "-", "-", "-", "-"
          continue
        }
        tt = 0; st = 0; rt = 0; fixed = 0; each = ""
        for (i = 1; i <= nodes[k]; i++) {
          tt += nt[k, i]; st += ns[k, i]; rt += nr[k, i]; fixed += irate[f[1], i] * secs * runs[k]
          each = each sprintf("%s%s", (i > 1 ? " " : ""), (ns[k, i] > 0 ? us(nt[k, i], ns[k, i]) : "idle"))
        }
        printf "%-5s %-7s %-8s %8.0f  %-14s %6.2f %7.3f %8s %7s  %-22s %7s %7s %6.2f %6s\n", f[1], f[2], f[3], t, per[k],
          t / direct[f[1], f[3]], med(lat[k]), us(tt, tx[k]), ((f[1], 1) in irate ? us(tt - fixed, tx[k]) : "-"), each,
          (f[2] == "lb" ? us(ha[k], tx[k]) : "-"), us(br[k], tx[k]), (st > 0 ? rt / st : 0), spool[k]
      }
      for (o = 1; o <= ni; o++) {
        n = idle_steps[o]; each = ""
        for (i = 1; i <= inodes[n]; i++) each = each sprintf("%s%.1f", (i > 1 ? " " : ""), irate[n, i] * 1000 / hz)
        if (o == 1) printf "\nIdle (no load), ms of CPU per second:\n"
        printf "  %s nodes: each node %s   HAProxy %.1f   broker %.1f\n", n, each, ih[n] * 1000 / hz, ib[n] * 1000 / hz
      }
    }' "$idle_results" "$results"
}

echo
echo "== Vigil cluster, pgbench -S: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)), load before $load_before, after $load_after"
echo "   pgbench -n -S -c $CLIENTS -j $THREADS -T $DURATION, $ROUNDS rounds interleaved per step; medians of the rounds; client leg TLS (sslmode=require) on every target"
echo "   deploy/cluster.sh: 3 coordinator members (TLS), N gateway nodes (Kafka sink, topic $topic of 3 partitions on $("$VIGIL_TANSU" --version | head -n 1), memory-only), HAProxy $(haproxy -v | sed -n 's/^HAProxy version \([^ ]*\).*/\1/p') leastconn with PROXY v2"
echo "   vigil $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')$( [[ -n "$(git -C "$repo" status --porcelain -- node proto coordinator 2>/dev/null)" ]] && echo ' + local changes') (release); $("$pg_bin/postgres" --version)"
echo "   CPU in us (utime+stime): nodes us = every node's CPU / transactions, net us = the same less the nodes' idle CPU (below) over the runs;"
echo "   us/stmt on each node = its CPU / the statements it counted;"
echo "   HAProxy = master and workers / transactions (the balancer hop); broker = the dev broker / transactions; rec/st = audit records per statement;"
echo "   spool = records not yet acknowledged by the broker, summed over the nodes, right after the last round. Every process shares the $(nproc) cores."
echo
report
echo
echo "Kafka topic $topic: vigil audit verify --kafka $kafka_summary"
[[ -n "$kafka_streams" ]] && printf '%s\n' "$kafka_streams"
echo "  $((kafka_verified + 0)) records verified on the topic, $kafka_local in the nodes' local logs"
[[ "$KEEP_WORKDIR" == 1 ]] && echo "Work dir (kept): $work"
((kafka_rc == 0)) || die "the Kafka topic does not verify, or does not hold every node's stream (see above)"
