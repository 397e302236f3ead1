# Shell helpers of the load test scripts (pgbench.sh, cluster.sh, ssh.sh, kube.sh): sourced, never run.
# The script sets `script` (its name: the prefix of its messages) before sourcing this file.
# shellcheck shell=bash disable=SC2034 # the settings and results here are read by the script
: "${script:?set script (the name in messages) before sourcing lib.sh}"

log() { printf '%s: %s\n' "$script" "$*" >&2; }
die() { printf '%s: ERROR: %s\n' "$script" "$*" >&2; exit 1; }

# The settings every script has (see each script's header).
dev_dir="${VIGIL_DEV_DIR:-/tmp/vigil-dev}"
target_dir="${CARGO_TARGET_DIR:-/var/cache/vigil/target}"
SKIP_BUILD="${SKIP_BUILD:-0}"
BUILD_PROFILE="${BUILD_PROFILE:-release}" # pgbench.sh, kube.sh: the cargo profile built and run
KEEP_WORKDIR="${KEEP_WORKDIR:-0}"
AUDIT_SYNC="${AUDIT_SYNC:-write}"
SESSION_THREADS="${SESSION_THREADS:-}" # the gateways' node.session_threads (empty: the node's default, one per CPU)
[[ -z "$SESSION_THREADS" || "$SESSION_THREADS" =~ ^[0-9]+$ ]] || die "SESSION_THREADS must be a whole number (got '$SESSION_THREADS')"
case "$AUDIT_SYNC" in write | fsync) ;; *) die "AUDIT_SYNC must be write or fsync (got '$AUDIT_SYNC')" ;; esac

show_log() { # FILE [LINES]: the end of a log, on stderr
  if [[ -f "$1" ]]; then
    printf -- '----- last lines of %s -----\n' "$1" >&2
    tail -n "${2:-30}" "$1" >&2 || true
  fi
}

proc_alive() {
  local state
  state="$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null)" || return 1
  [[ -n "$state" && "$state" != Z && "$state" != X ]]
}

stop_pid() { # pid name [seconds to wait for the exit before SIGKILL, default 15]
  local pid="$1"
  [[ -n "$pid" ]] && proc_alive "$pid" || return 0
  log "stopping $2 (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 "$((${3:-15} * 10))"); do proc_alive "$pid" || return 0; sleep 0.1; done
  log "$2 did not exit on SIGTERM; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
}

port_free() { ! ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

# utime + stime (clock ticks) from a /proc stat file: of a process (all its threads) or one task
cpu_ticks() {
  local stat
  stat="$(cat "$1")" || die "$1 is gone"
  stat="${stat##*) }" # fields from 3 on: state is $1, utime is $12, stime is $13
  awk '{ print $12 + $13 }' <<<"$stat"
}
now_us() { local t="$EPOCHREALTIME"; printf '%s\n' "${t/./}"; } # no fork: bash's clock (LC_ALL=C)

# percentile P < FILE of numbers (nearest rank)
percentile() {
  sort -n | awk -v p="$1" '{ v[NR] = $1 } END { if (NR == 0) { print ""; exit }
    i = int(NR * p); if (i < NR * p) i++; if (i < 1) i = 1; print v[i] }'
}
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print ""; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "-"; else printf "%.2f", a / b }'; }
diff_ms() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "") print "-"; else printf "%.2f", a - b }'; }
verdict() { # value op goal -> met / NOT met
  awk -v v="$1" -v g="$3" -v op="$2" 'BEGIN { if (v == "-" || v == "") { print "n/a"; exit }
    ok = (op == ">=") ? (v + 0 >= g + 0) : (v + 0 <= g + 0); print ok ? "met" : "NOT met" }'
}

# node_config DIR ID [ADMIN_PORT [AUDIT_LINE]]: the sections of a benchmark gateway's config
# before its protocol's: node ID with its data in DIR/data, admin on ADMIN_PORT (default
# $VIGIL_ADMIN_PORT), the dev OIDC provider, the audit log synced as AUDIT_SYNC says (plus
# AUDIT_LINE), an embedded coordinator on a free port.
# shellcheck disable=SC2154 # VIGIL_ADMIN_PORT, VIGIL_OIDC_ISSUER: the script's and the dev env's
node_config() {
  cat <<EOF
[node]
id = "$2"
data_dir = "$1/data"
${SESSION_THREADS:+session_threads = $SESSION_THREADS}
[admin]
listen = "127.0.0.1:${3:-$VIGIL_ADMIN_PORT}"
[log]
level = "info"
[identity]
issuer = "$VIGIL_OIDC_ISSUER"
audiences = ["${VIGIL_OIDC_AUDIENCE:-urn:vigil:gateway}"]
[audit]
${4:-}
sync = "$AUDIT_SYNC"
[coordinator]
listen = "127.0.0.1:0"
EOF
}

# bench_connection NAME PASSWORD_FILE: a `[[postgres.connections]]` entry NAME for the dev
# server's bench database, open to every authenticated principal.
# shellcheck disable=SC2154 # VIGIL_PG_*: the dev env's
bench_connection() {
  cat <<EOF
[[postgres.connections]]
name = "$1"
host = "$VIGIL_PG_HOST"
port = $VIGIL_PG_PORT
database = "bench"
user = "$VIGIL_PG_GATEWAY_USER"
password = { file = "$2" }
allow = { any_authenticated = true }
EOF
}

# wait_ready PID ADMIN_PORT PORT LOG SECONDS: waits until the vigil-node PID says ready on its
# admin endpoint and PORT listens; stops the script (showing LOG) if it exits or SECONDS pass.
wait_ready() {
  local deadline=$((SECONDS + $5))
  while ((SECONDS < deadline)) && proc_alive "$1"; do
    if curl -fsS -m 1 -o /dev/null "http://127.0.0.1:$2/readyz" 2>/dev/null && ! port_free "$3"; then
      return 0
    fi
    sleep 0.1
  done
  show_log "$4"
  die "vigil-node did not become ready"
}

# start_gateway DIR PORT: a fresh vigil-node ($vigil_node) on DIR/vigil.toml, which the
# script's `vigil_config DIR` writes; sets vigil_pid at once (so the cleanup trap stops it) and
# waits until its admin endpoint ($VIGIL_ADMIN_PORT) says ready and PORT listens.
# shellcheck disable=SC2154 # vigil_node, VIGIL_ADMIN_PORT: the script's
start_gateway() {
  local dir="$1" port="$2"
  mkdir -p "$dir/data"
  vigil_config "$dir" >"$dir/vigil.toml"
  "$vigil_node" --config "$dir/vigil.toml" </dev/null >"$dir/vigil.log" 2>&1 &
  vigil_pid=$!
  wait_ready "$vigil_pid" "$VIGIL_ADMIN_PORT" "$port" "$dir/vigil.log" 15
}

# verify_round DIR: ends a round's gateway (vigil_pid, data in DIR/data): its metrics saved
# (DIR/metrics.txt), a clean stop (its stream_end), then `vigil audit verify` ($vigil_cli) on
# its audit log (DIR/verify.txt). Sets verify_rc, verify_summary (the OK or FAILED line) and
# verify_records (records written, from the metrics).
# shellcheck disable=SC2154 # vigil_cli, VIGIL_ADMIN_PORT: the script's
verify_round() {
  local dir="$1"
  curl -fsS -m 5 "http://127.0.0.1:$VIGIL_ADMIN_PORT/metrics" >"$dir/metrics.txt" 2>/dev/null || : >"$dir/metrics.txt"
  stop_pid "$vigil_pid" vigil-node
  vigil_pid=""
  verify_rc=0
  "$vigil_cli" audit verify --log "$dir/data/audit" >"$dir/verify.txt" 2>&1 || verify_rc=$?
  verify_summary="$(grep -E '^(OK|FAILED)' "$dir/verify.txt" | tail -n 1 || true)"
  [[ -n "$verify_summary" ]] || verify_summary="$(tail -n 1 "$dir/verify.txt")"
  verify_records="$(awk '$1 == "vigil_audit_records_total" { print $2; exit }' "$dir/metrics.txt")"
}

# use_dev_servers NAME...: reuse the dev servers of deploy/dev/servers.sh when those NAMEd (its
# `status` lines: postgresql, oidc, kafka …) run, or start them all when none runs (then
# started_servers=1 and `finish` stops them); any other mix stops the script (they are not ours
# to stop). Then sources their env file.
# shellcheck disable=SC2154 # repo: the script's
use_dev_servers() {
  local status_out name missing=0
  status_out="$(VIGIL_DEV_DIR="$dev_dir" "$repo/deploy/dev/servers.sh" status 2>/dev/null || true)"
  for name in "$@"; do grep -Eq "^$name +running" <<<"$status_out" || missing=1; done
  if ((!missing)); then
    log "reusing the dev servers in $dev_dir"
  elif ! grep -Eq '^[a-z-]+ +(running|paused)' <<<"$status_out"; then
    log "starting the dev servers in $dev_dir (stopped again at the end)"
    started_servers=1
    VIGIL_DEV_DIR="$dev_dir" "$repo/deploy/dev/servers.sh" start
  else
    die "not all of $* run in $dev_dir while other dev servers do (or one is paused); fix that with deploy/dev/servers.sh start (they are not ours to stop), or use another VIGIL_DEV_DIR and ports"
  fi
  # shellcheck disable=SC1091
  source "$dev_dir/env"
}

# fresh_token: sets token to an access token of the dev agent agent-reporting, a new one when
# the last is older than 240 s (the dev provider's tokens live 600 s; a gateway checks them at
# login).
token=""
token_at=0
# shellcheck disable=SC2154 # node_bin: the script's; VIGIL_OIDC_*: the dev env's
fresh_token() {
  if ((SECONDS - token_at > 240)) || [[ -z "$token" ]]; then
    token="$("$node_bin" "$VIGIL_OIDC_DIR/token.mjs" --issuer "$VIGIL_OIDC_ISSUER" \
      --client agent-reporting --secret agent-reporting-secret)" || die "could not get an access token"
    token_at=$SECONDS
  fi
}

# pgbench_result FILE WHAT: reads pgbench's report in FILE into tps, lat (average, ms) and txns;
# stops the script (showing FILE) when it cannot, or when a transaction failed (WHAT names the
# run in the message).
pgbench_result() {
  local failed
  tps="$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time).*/\1/p' "$1")"
  lat="$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' "$1")"
  txns="$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$1")"
  failed="$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$1")"
  [[ -n "$tps" && -n "$lat" && -n "$txns" ]] || { show_log "$1"; die "cannot read pgbench's report ($2)"; }
  [[ -z "$failed" || "$failed" == 0 ]] || { show_log "$1"; die "$failed failed transactions ($2)"; }
}

# verify_topic TOPIC OUT AUDIT_DIR...: `vigil audit verify --kafka` ($vigil_cli) on TOPIC of the
# dev broker, output in OUT, once the nodes whose local logs are the AUDIT_DIRs have stopped
# cleanly (stream_end written, spool shipped). Sets kafka_rc (0: verified and complete),
# kafka_summary, kafka_streams (the first lines naming streams), kafka_verified, kafka_local.
# Verify passes on a topic that stops short (an open stream); after a clean stop the topic must
# hold every record of the local logs, stream_end included, or kafka_rc is 1.
# shellcheck disable=SC2154 # vigil_cli: the script's; VIGIL_KAFKA_BROKERS: the dev env's
verify_topic() {
  local topic="$1" out="$2" line d; shift 2
  kafka_rc=0
  "$vigil_cli" audit verify --kafka "$VIGIL_KAFKA_BROKERS" --topic "$topic" >"$out" 2>&1 || kafka_rc=$?
  line="$(grep -E '^(OK|FAILED)' "$out" | tail -n 1 || true)"
  kafka_summary="exit $kafka_rc: ${line:-$(tail -n 1 "$out")}"
  kafka_streams="$(grep -E '^(stream|FAIL) ' "$out" | head -n 5 | sed 's/^/  /' || true)"
  kafka_verified="$(sed -n 's/^OK: \([0-9]*\) records .*/\1/p' "$out")"
  kafka_local=0
  for d in "$@"; do
    kafka_local=$((kafka_local + $(cat "$d"/*.jsonl 2>/dev/null | wc -l || true)))
  done
  if ((kafka_rc == 0)) && [[ "${kafka_verified:-0}" != "$kafka_local" ]]; then
    kafka_rc=1
    kafka_summary="$kafka_summary; but the local logs hold $kafka_local records: the topic is incomplete"
  fi
}

# create_topic PREFIX LOG: creates a fresh topic of one partition on the dev broker, named
# PREFIX-<UTC time>-<pid> (create fails on an existing one), and sets topic to it (from then on
# a cleanup that calls delete_topic "$topic" deletes it); Tansu's output in LOG.
# shellcheck disable=SC2154 # VIGIL_TANSU, VIGIL_KAFKA_URL: the dev env's
create_topic() {
  local name
  name="$1-$(date -u +%Y%m%d%H%M%S)-$$"
  # tansu retries forever when the broker does not answer, hence the timeout
  timeout 30 "$VIGIL_TANSU" topic create "$name" --partitions 1 --broker "$VIGIL_KAFKA_URL" >"$2" 2>&1 \
    || { show_log "$2"; die "cannot create the topic $name on $VIGIL_KAFKA_URL"; }
  topic="$name"
}

# kafka_config TOPIC: the `[audit.kafka]` section of a node whose audit log is the spool of a
# Kafka sink to TOPIC on the dev broker, with the lines of KAFKA_EXTRA (for example
# KAFKA_EXTRA='compression = "lz4"'; docs/configuration.md lists the keys).
# shellcheck disable=SC2154 # VIGIL_KAFKA_BROKERS: the dev env's
kafka_config() {
  printf '\n[audit.kafka]\nbrokers = ["%s"]\ntopic = "%s"\n' "$VIGIL_KAFKA_BROKERS" "$1"
  [[ -z "${KAFKA_EXTRA:-}" ]] || printf '%s\n' "$KAFKA_EXTRA"
}

# delete_topic TOPIC: deletes the run's topic from the dev broker, unless KEEP_WORKDIR=1 (or TOPIC
# is empty: none was made). The broker is memory-only: a topic left behind holds the run's
# records until it restarts.
# shellcheck disable=SC2154 # VIGIL_TANSU, VIGIL_KAFKA_URL: the dev env's
delete_topic() {
  [[ -n "$1" ]] || return 0
  if [[ "$KEEP_WORKDIR" == 1 ]]; then
    log "kept the topic $1"
  else
    timeout 30 "$VIGIL_TANSU" topic delete "$1" --broker "$VIGIL_KAFKA_URL" >/dev/null 2>&1 \
      || log "could not delete the topic $1"
  fi
}

# The end of a script's EXIT trap (`cleanup`, which stops what the script started first): stops
# the dev servers if the script started them (started_servers=1), removes the work dir ($work;
# KEEP_WORKDIR=1 keeps it) and exits with RC.
# shellcheck disable=SC2154 # started_servers, dev_dir, repo, work, KEEP_WORKDIR: the script's
finish() { # RC
  if ((started_servers)); then
    log "stopping the dev servers this script started"
    VIGIL_DEV_DIR="$dev_dir" "$repo/deploy/dev/servers.sh" stop
  fi
  if [[ -n "$work" && -d "$work" ]]; then
    if [[ "$KEEP_WORKDIR" == 1 ]]; then
      log "kept $work"
    else
      rm -rf -- "$work"
    fi
  fi
  exit "$1"
}
# `cleanup` on exit, and an exit (so cleanup) on Ctrl-C or SIGTERM
trap_cleanup() {
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}
ports_free() { # VAR...: the ports these variables name must be free
  local p
  for p in "$@"; do
    port_free "${!p}" || die "port ${!p} ($p) is in use on this machine; choose another with $p=..."
  done
}
