# Shell helpers of the load test scripts (pgbench.sh, ssh.sh, kube.sh): sourced, never run.
# The script sets `script` (its name: the prefix of its messages) before sourcing this file.
# shellcheck shell=bash disable=SC2034 # the settings and results here are read by the script
: "${script:?set script (the name in messages) before sourcing lib.sh}"

log() { printf '%s: %s\n' "$script" "$*" >&2; }
die() { printf '%s: ERROR: %s\n' "$script" "$*" >&2; exit 1; }

# The settings every script has (see each script's header).
dev_dir="${VIGIL_DEV_DIR:-/tmp/vigil-dev}"
target_dir="${CARGO_TARGET_DIR:-/var/cache/vigil/target}"
SKIP_BUILD="${SKIP_BUILD:-0}"
KEEP_WORKDIR="${KEEP_WORKDIR:-0}"
AUDIT_SYNC="${AUDIT_SYNC:-write}"
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

# start_gateway DIR PORT: a fresh vigil-node ($vigil_node) on DIR/vigil.toml, which the
# script's `vigil_config DIR` writes; sets vigil_pid at once (so the cleanup trap stops it) and
# waits until its admin endpoint ($VIGIL_ADMIN_PORT) says ready and PORT listens.
# shellcheck disable=SC2154 # vigil_node, VIGIL_ADMIN_PORT: the script's
start_gateway() {
  local dir="$1" port="$2" ready=0
  mkdir -p "$dir/data"
  vigil_config "$dir" >"$dir/vigil.toml"
  "$vigil_node" --config "$dir/vigil.toml" </dev/null >"$dir/vigil.log" 2>&1 &
  vigil_pid=$!
  for _ in $(seq 1 150); do
    proc_alive "$vigil_pid" || break
    if curl -fsS -m 1 -o /dev/null "http://127.0.0.1:$VIGIL_ADMIN_PORT/readyz" 2>/dev/null \
       && ! port_free "$port"; then
      ready=1; break
    fi
    sleep 0.1
  done
  ((ready)) || { show_log "$dir/vigil.log"; die "vigil-node did not become ready"; }
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
