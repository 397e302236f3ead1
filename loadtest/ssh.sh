#!/usr/bin/env bash
# Side-by-side SSH: direct to the dev sshd vs through the Vigil SSH gateway (every byte recorded,
# audit on), with the stock OpenSSH client on both paths.
#
#   loadtest/ssh.sh                                  # defaults: 1 GiB transfers, 3 rounds
#   BULK_MB=64 ROUNDS=1 EXEC_N=50 loadtest/ssh.sh    # quick pass
#
# Run as root on the dev machine (see loadtest/README.md). It reuses the dev servers of
# deploy/dev/servers.sh when they run (it needs the OIDC provider and the sshd), otherwise starts
# them and stops them at the end; it builds the release gateway and CLI, mints a user CA and a
# Vigil certificate, and in each round starts a fresh gateway (host `web` = the dev sshd, pinned
# host key, the dev gateway key) in a temporary directory. Each round runs every measure against
# both targets, in an order that alternates between rounds:
#   direct  ssh -i $VIGIL_DEV_SSH_DIRECT_KEY $VIGIL_DEV_SSH_LOGIN@$VIGIL_DEV_SSHD_ADDR
#   vigil   ssh -i KEY (+ KEY-cert.pub) $VIGIL_DEV_SSH_LOGIN+web@127.0.0.1:$VIGIL_SSH_PORT
# Measures:
#   download   ssh HOST 'head -c ${BULK_MB}M /dev/zero' >/dev/null                  MiB/s
#   upload     head -c ${BULK_MB}M /dev/zero | ssh HOST 'cat >/dev/null'             MiB/s
#   scp        scp -O (legacy protocol) of a ${BULK_MB} MiB file to HOST:/dev/null    MiB/s
#   scp-sftp   scp -s (SFTP, the default since OpenSSH 9.0), the same file            MiB/s
#   exec       EXEC_N x `ssh -S CTL HOST true` on a kept ControlMaster connection    p50/p99 ms
#   echo       ECHO_N keystrokes typed into a login shell on a pty (python3), the time
#              from writing a key to reading its echo                                 p50/p99 ms
# plus the gateway's CPU (utime+stime of vigil-node from /proc) per MiB moved or per operation.
# At the end of each round the gateway is stopped cleanly and `vigil audit verify` checks its
# audit log (records and recordings); its recordings are then deleted (each round records about
# 4 x BULK_MB). The goals are only reported: they never change the exit status; a failed
# transfer or an audit log that does not verify does (exit 1).
#
# Settings (environment):
#   BULK_MB=1024         MiB per bulk transfer (download, upload, scp, scp-sftp)
#   ROUNDS=3             interleaved rounds; the table shows the median per measure and target
#   EXEC_N=200           exec round trips per target and round (plus 5 unmeasured)
#   ECHO_N=200           keystrokes per target and round (0: echo not measured)
#   EOF_N=20             with exec: also this many `ssh -S CTL HOST true </dev/null` per target
#                        and round (stdin at EOF at once), counting those that end without an
#                        exit status (reported, not timed; 0: skip). The timed execs keep stdin
#                        open.
#   MEASURES="download upload scp scp-sftp exec echo"
#   VIGIL_SSH_PORT=16422 VIGIL_ADMIN_PORT=19190   the gateway's listen ports (127.0.0.1)
#   VIGIL_DEV_DIR=/tmp/vigil-dev   dev servers' state dir (servers.sh)
#   CARGO_TARGET_DIR=/var/cache/vigil/target   SKIP_BUILD=1 uses the binaries already there
#   KEEP_WORKDIR=1       keep the temporary directory (logs, samples, audit logs AND recordings:
#                        about 4 x BULK_MB per round)
#   AUDIT_SYNC=write     the gateway's audit.sync: write, or fsync
#   PROFILE=1            perf record -e cpu-clock -g the gateway during the last round's vigil
#                        download and print the top symbols
set -euo pipefail
export LC_ALL=C # EPOCHREALTIME with a '.', awk number formats

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

BULK_MB="${BULK_MB:-1024}"
ROUNDS="${ROUNDS:-3}"
EXEC_N="${EXEC_N:-200}"
ECHO_N="${ECHO_N:-200}"
EOF_N="${EOF_N:-20}"
read -r -a MEASURES <<<"${MEASURES:-download upload scp scp-sftp exec echo}"
VIGIL_SSH_PORT="${VIGIL_SSH_PORT:-16422}"
VIGIL_ADMIN_PORT="${VIGIL_ADMIN_PORT:-19190}"
PROFILE="${PROFILE:-0}"

# The issue's goals (reported, never enforced).
GOAL_DOWNLOAD_RATIO=0.45 # vigil / direct MiB/s
GOAL_EXEC_P50_MS=1       # added exec round trip, vigil - direct
GOAL_EXEC_P99_MS=3

script=ssh.sh
# shellcheck source=loadtest/lib.sh
source "$here/lib.sh" # the common settings (dev_dir, target_dir, SKIP_BUILD, KEEP_WORKDIR, AUDIT_SYNC); log, die, stop_pid, ratio …

for v in BULK_MB ROUNDS EXEC_N ECHO_N EOF_N VIGIL_SSH_PORT VIGIL_ADMIN_PORT; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a whole number (got '${!v}')"
done
((BULK_MB > 0 && ROUNDS > 0 && EXEC_N > 0)) || die "BULK_MB, ROUNDS, EXEC_N must be > 0"
for m in "${MEASURES[@]}"; do
  case "$m" in download | upload | scp | scp-sftp | exec | echo) ;; *) die "unknown measure '$m'" ;; esac
done
[[ "$(id -u)" == 0 ]] || die "run as root (like the dev servers)"
has_measure() { [[ " ${MEASURES[*]} " == *" $1 "* ]]; }
for tool in ssh scp ssh-keygen curl; do
  command -v "$tool" >/dev/null || die "$tool not found"
done
echo_note="" # why echo is not measured, if it is not
if has_measure echo; then
  if ((ECHO_N == 0)); then
    echo_note="not measured (ECHO_N=0)"
  elif ! python3 -c 'import pty, select, termios, fcntl, struct' 2>/dev/null; then
    echo_note="not measured (python3 with the pty module not found)"
  fi
else
  echo_note="not measured (not in MEASURES)"
fi
if [[ "$PROFILE" == 1 ]]; then
  has_measure download || die "PROFILE=1 profiles the vigil download: keep download in MEASURES"
  command -v perf >/dev/null || die "PROFILE=1 needs perf"
fi

# ---------------------------------------------------------------------------- cleanup
work=""
vigil_pid=""
perf_pid=""
started_servers=0
declare -A MASTER_PID # target -> pid of its ControlMaster

stop_masters() {
  local t
  for t in "${!MASTER_PID[@]}"; do
    ssh -F "$work/ssh_config" -S "$work/ctl-$t" -O exit "$t" >/dev/null 2>&1 || true
    stop_pid "${MASTER_PID[$t]}" "ssh ControlMaster ($t)" 5
    unset "MASTER_PID[$t]"
  done
}

cleanup() {
  local rc=$?
  set +e
  [[ -n "$perf_pid" ]] && { kill -INT "$perf_pid" 2>/dev/null; wait "$perf_pid" 2>/dev/null; }
  [[ -n "$work" ]] && stop_masters
  [[ -n "$keep_pid" ]] && kill "$keep_pid" 2>/dev/null
  stop_pid "$vigil_pid" vigil-node
  finish "$rc"
}
trap_cleanup

# ---------------------------------------------------------------------------- prerequisites
ports_free VIGIL_SSH_PORT VIGIL_ADMIN_PORT

# ---------------------------------------------------------------------------- dev servers
# The gateway needs the OIDC provider (its [identity] issuer) and the sshd (its target).
status_out="$(VIGIL_DEV_DIR="$dev_dir" "$repo/deploy/dev/servers.sh" status 2>/dev/null || true)"
oidc_up=0 sshd_up=0 any_up=0
grep -q '^oidc        running' <<<"$status_out" && oidc_up=1
grep -q '^sshd        running' <<<"$status_out" && sshd_up=1
grep -Eq '^[a-z]+ +(running|paused)' <<<"$status_out" && any_up=1
if ((oidc_up && sshd_up)); then
  log "reusing the dev servers in $dev_dir"
elif ((!any_up)); then
  log "starting the dev servers in $dev_dir (stopped again at the end)"
  started_servers=1
  VIGIL_DEV_DIR="$dev_dir" "$repo/deploy/dev/servers.sh" start
else
  die "the OIDC provider or the sshd in $dev_dir does not run while other dev servers do; fix that with deploy/dev/servers.sh start (they are not ours to stop), or use another VIGIL_DEV_DIR and ports"
fi
[[ -f "$dev_dir/env" ]] || VIGIL_DEV_DIR="$dev_dir" "$repo/deploy/dev/servers.sh" start
# shellcheck disable=SC1091
source "$dev_dir/env"
for v in VIGIL_DEV_SSHD_ADDR VIGIL_DEV_SSHD_HOST_KEY VIGIL_DEV_SSH_GATEWAY_KEY VIGIL_DEV_SSH_DIRECT_KEY \
         VIGIL_DEV_SSH_LOGIN VIGIL_OIDC_ISSUER; do
  [[ -n "${!v:-}" ]] || die "$dev_dir/env has no $v: restart the dev servers with this checkout's deploy/dev/servers.sh"
done
sshd_host="${VIGIL_DEV_SSHD_ADDR%:*}"
sshd_port="${VIGIL_DEV_SSHD_ADDR##*:}"

# ---------------------------------------------------------------------------- build
if [[ "$SKIP_BUILD" != 1 ]]; then
  log "building the release gateway and CLI (CARGO_TARGET_DIR=$target_dir; may wait for another build's lock)"
  (cd "$repo" && CARGO_TARGET_DIR="$target_dir" cargo build --release -p vigil-node -p vigil-cli) \
    || die "cargo build failed"
fi
vigil_node="$target_dir/release/vigil-node"
vigil_cli="$target_dir/release/vigil"
[[ -x "$vigil_node" && -x "$vigil_cli" ]] || die "$vigil_node or $vigil_cli missing (build first, or unset SKIP_BUILD)"

# ---------------------------------------------------------------------------- work dir
# Disk: every byte through the gateway is recorded (recordings/SESSION.bin in its audit dir):
# about 4 x BULK_MB per round, deleted after each round's verification unless KEEP_WORKDIR=1.
# The transfer source is a sparse file; the streams come from /dev/zero.
bulk_measures=0
for m in download upload scp scp-sftp; do has_measure "$m" && bulk_measures=$((bulk_measures + 1)); done
rounds_kept=1
[[ "$KEEP_WORKDIR" == 1 ]] && rounds_kept="$ROUNDS"
need_mb=$((bulk_measures * BULK_MB * rounds_kept * 105 / 100 + 1024))
free_mb="$(df -Pm /tmp | awk 'NR == 2 { print $4 }')"
((free_mb >= need_mb)) || die "about ${need_mb} MB of disk needed in /tmp (the gateway's recordings), ${free_mb} MB free; free some, or lower BULK_MB"

work="$(mktemp -d /tmp/vigil-ssh.XXXXXX)"
chmod 755 "$work"
mkdir -p "$work/keys" "$work/samples"
results="$work/results.tsv" # round measure target value(MiB/s | ms median) cpu_ticks audit_ticks units
: >"$results"

# The user CA and a certificate for the principal agent-ops (as chaos/src/ssh.rs mints them).
principal='{"subject":"agent-ops","client_id":"agent-ops","model":"loadtest","groups":["ops"],"issuer":"loadtest","token_type":"access_token"}'
ssh-keygen -q -t ed25519 -N '' -C vigil-ssh-bench-ca -f "$work/keys/ca"
ssh-keygen -q -t ed25519 -N '' -C vigil-ssh-bench-user -f "$work/keys/user"
ssh-keygen -q -s "$work/keys/ca" -I ssh-bench -n agent-ops -V -5m:+12h -O clear -O permit-pty \
  -O "extension:principal@vigil=$principal" "$work/keys/user.pub" 2>"$work/keys/cert.log" \
  || { show_log "$work/keys/cert.log"; die "ssh-keygen -s failed"; }
src="$work/bulk.bin"
truncate -s "${BULK_MB}M" "$src" # sparse: reads as zeros, takes no disk

# One client config for both targets (-F: no user or system config gets in the way).
cat >"$work/ssh_config" <<EOF
Host *
  BatchMode yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
  IdentitiesOnly yes
  Compression no
  ControlMaster no
  ControlPath none
  ForwardAgent no
  ServerAliveInterval 0
Host direct
  HostName $sshd_host
  Port $sshd_port
  User $VIGIL_DEV_SSH_LOGIN
  IdentityFile $VIGIL_DEV_SSH_DIRECT_KEY
Host vigil
  HostName 127.0.0.1
  Port $VIGIL_SSH_PORT
  User $VIGIL_DEV_SSH_LOGIN+web
  IdentityFile $work/keys/user
  CertificateFile $work/keys/user-cert.pub
EOF
cfg="$work/ssh_config"
TARGETS=(direct vigil)

# ---------------------------------------------------------------------------- Vigil
vigil_config() { # DIR
  node_config "$1" ssh-bench
  cat <<EOF

[ssh]
listen = "127.0.0.1:$VIGIL_SSH_PORT"
user_ca_key = { file = "$work/keys/ca" }

[[ssh.targets]]
name = "web"
address = "$VIGIL_DEV_SSHD_ADDR"
host_keys = ["$VIGIL_DEV_SSHD_HOST_KEY"]
login_key = { file = "$VIGIL_DEV_SSH_GATEWAY_KEY" }
logins = ["$VIGIL_DEV_SSH_LOGIN"]
allow = { client_ids = ["agent-ops"] }
EOF
}

# start_vigil DIR: a fresh gateway on DIR/vigil.toml; sets vigil_pid at once (so the cleanup
# trap stops it) and waits until it is ready and lets the certificate in.
start_vigil() {
  start_gateway "$1" "$VIGIL_SSH_PORT"
  log "vigil-node ready (pid $vigil_pid, ssh 127.0.0.1:$VIGIL_SSH_PORT, admin $VIGIL_ADMIN_PORT)"
}

# ---------------------------------------------------------------------------- measuring
# "process_ticks audit_thread_ticks" of the gateway (its `vigil-audit` thread writes records
# and recordings)
proc_sample() {
  local pid="$1" total audit=0 t
  total="$(cpu_ticks "/proc/$pid/stat")"
  for t in /proc/"$pid"/task/*; do
    [[ "$(cat "$t/comm" 2>/dev/null)" == vigil-audit ]] && audit=$((audit + $(cpu_ticks "$t/stat")))
  done
  printf '%s %s\n' "$total" "$audit"
}

# before_run TARGET / after_run TARGET: the gateway's CPU around a vigil run (0 0 for direct)
b_cpu=0 b_audit=0 d_cpu=0 d_audit=0
before_run() { b_cpu=0 b_audit=0; [[ "$1" == vigil ]] && read -r b_cpu b_audit < <(proc_sample "$vigil_pid"); return 0; }
after_run() {
  d_cpu=0 d_audit=0
  if [[ "$1" == vigil ]]; then
    local a_cpu a_audit
    proc_alive "$vigil_pid" || { show_log "$rdir/vigil.log"; die "vigil-node is gone"; }
    read -r a_cpu a_audit < <(proc_sample "$vigil_pid")
    d_cpu=$((a_cpu - b_cpu)) d_audit=$((a_audit - b_audit))
  fi
}

# bulk_run ROUND MEASURE TARGET: one transfer of BULK_MB MiB; appends a line to $results
bulk_run() {
  local round="$1" m="$2" t="$3" out="$work/samples/$2.$3.r$1.log" t0 t1 rc=0
  before_run "$t"
  t0="$(now_us)"
  case "$m" in
    download) ssh -F "$cfg" "$t" "head -c ${BULK_MB}M /dev/zero" >/dev/null 2>"$out" || rc=$? ;;
    upload) head -c "${BULK_MB}M" /dev/zero | ssh -F "$cfg" "$t" 'cat >/dev/null' 2>"$out" || rc=$? ;;
    scp) scp -O -q -F "$cfg" "$src" "$t:/dev/null" 2>"$out" || rc=$? ;;
    # (sshd's SFTP server cannot fsetstat /dev/null: scp prints it and still exits 0)
    scp-sftp) scp -s -q -F "$cfg" "$src" "$t:/dev/null" 2>"$out" || rc=$? ;;
  esac
  t1="$(now_us)"
  after_run "$t"
  if ((rc != 0)); then
    show_log "$out"
    [[ "$t" == vigil ]] && show_log "$rdir/vigil.log"
    die "$m through $t failed (exit $rc)"
  fi
  local mibs
  mibs="$(awk -v mb="$BULK_MB" -v us="$((t1 - t0))" 'BEGIN { printf "%.1f", mb / (us / 1e6) }')"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$m" "$t" "$mibs" "$d_cpu" "$d_audit" "$BULK_MB" >>"$results"
  log "round $round  $(printf '%-9s %-6s' "$m" "$t") $(printf '%8s' "$mibs") MiB/s  $(awk -v us="$((t1 - t0))" 'BEGIN { printf "%.2f", us / 1e6 }') s"
}

# start_master TARGET: a ControlMaster connection for TARGET on $work/ctl-TARGET
start_master() {
  local t="$1" pid
  ssh -F "$cfg" -o ControlMaster=yes -o "ControlPath=$work/ctl-$t" -o ControlPersist=yes -N -f "$t" \
    2>"$work/samples/master.$t.log" || { show_log "$work/samples/master.$t.log"; die "cannot open a ControlMaster to $t"; }
  pid="$(ssh -F "$cfg" -S "$work/ctl-$t" -O check "$t" 2>&1 | sed -n 's/.*pid=\([0-9]*\).*/\1/p')"
  [[ -n "$pid" ]] || die "the ControlMaster to $t does not answer"
  MASTER_PID[$t]="$pid"
}

# The execs' stdin: a pipe that stays open (no EOF reaches the host before the command ends, as
# with an interactive caller). See eof_run for stdin at EOF.
keep_fd=""
keep_pid=""
open_keep() {
  [[ -n "$keep_fd" ]] && return 0
  exec {keep_fd}< <(exec sleep 1000000)
  keep_pid=$!
}

# exec_run ROUND TARGET: EXEC_N `ssh -S CTL TARGET true` on the kept connection
exec_run() {
  local round="$1" t="$2" samples="$work/samples/exec.$2.r$1" i t0 t1
  open_keep
  for i in 1 2 3 4 5; do # warm-up, not measured
    ssh -F "$cfg" -S "$work/ctl-$t" "$t" true <&"$keep_fd" 2>>"$samples.err" || { show_log "$samples.err"; die "exec through $t failed"; }
  done
  : >"$samples"
  before_run "$t"
  for ((i = 0; i < EXEC_N; i++)); do
    t0="$EPOCHREALTIME"
    ssh -F "$cfg" -S "$work/ctl-$t" "$t" true <&"$keep_fd" 2>>"$samples.err" || { show_log "$samples.err"; die "exec through $t failed"; }
    t1="$EPOCHREALTIME"
    printf '%s\n' "$(( ${t1/./} - ${t0/./} ))" >>"$samples"
  done
  after_run "$t"
  local p50 p99
  p50="$(percentile 0.50 <"$samples")" p99="$(percentile 0.99 <"$samples")"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" exec "$t" "$(awk -v u="$p50" 'BEGIN { printf "%.3f", u / 1000 }')" \
    "$d_cpu" "$d_audit" "$EXEC_N" >>"$results"
  log "round $round  exec      $(printf '%-6s' "$t") p50 $(awk -v u="$p50" 'BEGIN { printf "%.2f", u / 1000 }') ms  p99 $(awk -v u="$p99" 'BEGIN { printf "%.2f", u / 1000 }') ms"
}

# eof_run ROUND TARGET: EOF_N `ssh -S CTL TARGET true </dev/null` on the kept connection (stdin
# at EOF at once, as in scripts); counts the runs that end without an exit status (ssh exits 255).
# Not timed, not fatal: reported under the table.
eof_run() {
  local round="$1" t="$2" i rc lost=0
  for ((i = 0; i < EOF_N; i++)); do
    rc=0
    ssh -F "$cfg" -S "$work/ctl-$t" "$t" true </dev/null 2>>"$work/samples/eof.$t.r$round.err" || rc=$?
    ((rc == 0)) || lost=$((lost + 1))
  done
  printf '%s\t%s\t%s\t%s\n' "$round" "$t" "$lost" "$EOF_N" >>"$work/eof.tsv"
  ((lost == 0)) || log "round $round  exec </dev/null through $t: $lost of $EOF_N ended without an exit status"
}

# The keystroke helper: runs `ssh -tt HOST` (a login shell) on a pty, waits for the prompt to
# settle, then types N letters one at a time, each timed from the write to the read of its echo
# (readline echoes each key); Ctrl-U clears the line every 40 keys (not timed). Prints µs per key.
cat >"$work/echo.py" <<'EOF'
import fcntl, os, pty, select, struct, sys, termios, time
n = int(sys.argv[1]); argv = sys.argv[2:]
pid, fd = pty.fork()
if pid == 0:
    fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    os.execvp(argv[0], argv)
def read(timeout):
    r, _, _ = select.select([fd], [], [], timeout)
    if not r:
        return None
    try:
        return os.read(fd, 65536) or b""
    except OSError:
        return b""
def settle(quiet, limit):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        d = read(quiet)
        if d is None:
            return True
        if d == b"":
            sys.exit("echo.py: the session ended early")
    return False
if read(30) in (None, b""):
    sys.exit("echo.py: no prompt within 30 s")
settle(0.5, 30)
keys = b"abcdefghijklmnopqrstuvwxyz"
for i in range(n):
    if i and i % 40 == 0:
        os.write(fd, b"\x15")
        settle(0.2, 5)
    k = keys[i % 26:i % 26 + 1]
    t0 = time.perf_counter_ns()
    os.write(fd, k)
    end = time.monotonic() + 10
    while True:
        d = read(max(0.0, end - time.monotonic()))
        if d is None or d == b"":
            sys.exit("echo.py: no echo of key %d" % i)
        if k in d:
            break
    print((time.perf_counter_ns() - t0) // 1000)
os.write(fd, b"\x15exit\r")
end = time.monotonic() + 10
while time.monotonic() < end and read(1) not in (None, b""):
    pass
if os.waitpid(pid, os.WNOHANG) == (0, 0):
    os.kill(pid, 15)
    os.waitpid(pid, 0)
EOF

# echo_run ROUND TARGET: ECHO_N keystrokes in a login shell on a fresh connection
echo_run() {
  local round="$1" t="$2" samples="$work/samples/echo.$2.r$1"
  before_run "$t"
  python3 "$work/echo.py" "$ECHO_N" ssh -F "$cfg" -tt "$t" >"$samples" 2>"$samples.err" \
    || { show_log "$samples.err"; die "keystroke echo through $t failed"; }
  after_run "$t"
  [[ "$(wc -l <"$samples")" == "$ECHO_N" ]] || { show_log "$samples.err"; die "keystroke echo through $t: $(wc -l <"$samples") of $ECHO_N samples"; }
  local p50 p99
  p50="$(percentile 0.50 <"$samples")" p99="$(percentile 0.99 <"$samples")"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" echo "$t" "$(awk -v u="$p50" 'BEGIN { printf "%.3f", u / 1000 }')" \
    "$d_cpu" "$d_audit" "$ECHO_N" >>"$results"
  log "round $round  echo      $(printf '%-6s' "$t") p50 $(awk -v u="$p50" 'BEGIN { printf "%.2f", u / 1000 }') ms  p99 $(awk -v u="$p99" 'BEGIN { printf "%.2f", u / 1000 }') ms"
}

# ---------------------------------------------------------------------------- rounds
audit_rc=0
verify_lines=()
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
log "$ROUNDS rounds of: ${MEASURES[*]} (BULK_MB=$BULK_MB, EXEC_N=$EXEC_N, ECHO_N=$ECHO_N), direct vs vigil"
ciphers=""
for ((r = 1; r <= ROUNDS; r++)); do
  rdir="$work/r$r"
  start_vigil "$rdir"
  if ((r == 1)); then # the ciphers OpenSSH negotiates on each path (the client's leg)
    for t in "${TARGETS[@]}"; do
      c="$(ssh -v -F "$cfg" "$t" true 2>&1 | sed -n 's/.*kex: server->client cipher: \([^ ]*\).*/\1/p' | head -n 1)"
      ciphers+="${ciphers:+, }$t $c"
    done
  fi
  for t in "${TARGETS[@]}"; do # both paths answer (and warm up)
    out="$(ssh -F "$cfg" "$t" 'echo ok' 2>&1)" || { show_log "$rdir/vigil.log"; die "ssh to $t failed: $out"; }
    [[ "$out" == ok ]] || die "ssh to $t: unexpected answer: $out"
  done
  mi=0
  for m in "${MEASURES[@]}"; do
    # alternate which target goes first, per round and per measure
    if (((r + mi) % 2)); then order=(direct vigil); else order=(vigil direct); fi
    mi=$((mi + 1))
    case "$m" in
      download | upload | scp | scp-sftp)
        for t in "${order[@]}"; do
          if [[ "$PROFILE" == 1 && "$m" == download && "$t" == vigil && $r == "$ROUNDS" ]]; then
            perf record -e cpu-clock -g -p "$vigil_pid" -o "$work/perf.data" >"$work/perf.log" 2>&1 &
            perf_pid=$!
            sleep 0.5
            bulk_run "$r" "$m" "$t"
            kill -INT "$perf_pid" 2>/dev/null || true
            wait "$perf_pid" 2>/dev/null || true
            perf_pid=""
          else
            bulk_run "$r" "$m" "$t"
          fi
        done ;;
      exec)
        for t in "${order[@]}"; do start_master "$t"; done
        for t in "${order[@]}"; do exec_run "$r" "$t"; done
        if ((EOF_N > 0)); then for t in "${order[@]}"; do eof_run "$r" "$t"; done; fi
        stop_masters ;;
      echo)
        [[ -z "$echo_note" ]] || continue
        for t in "${order[@]}"; do echo_run "$r" "$t"; done ;;
    esac
  done
  # The round's audit log: metrics, a clean stop (stream_end), verify, then drop the recordings.
  verify_round "$rdir"
  audit="$rdir/data/audit"
  ((verify_rc == 0)) || audit_rc=1
  rec_bytes="$(du -sb "$audit/recordings" 2>/dev/null | cut -f1 || echo 0)"
  verify_lines+=("$(printf 'round %d: exit %d: %s; %s records, recordings %.1f MiB' "$r" "$verify_rc" \
    "$verify_summary" "${verify_records:-?}" "$(awk -v b="${rec_bytes:-0}" 'BEGIN { print b / 1048576 }')")")
  log "${verify_lines[-1]}"
  ((verify_rc == 0)) || show_log "$rdir/verify.txt"
  [[ "$KEEP_WORKDIR" == 1 ]] || rm -rf -- "$audit/recordings"
done
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"
rm -f -- "$src"

# ---------------------------------------------------------------------------- report
field() { awk -F'\t' -v m="$1" -v t="$2" -v c="$3" '$2 == m && $3 == t { print $c }' "$results"; } # measure target column
per_round() { awk -F'\t' -v m="$1" -v t="$2" '$2 == m && $3 == t { printf "%s%s", sep, $4; sep = " " }' "$results"; }
clk_tck="$(getconf CLK_TCK)"
# the gateway's CPU over all rounds of a measure: "ms per unit, audit thread ms per unit"
gw_cpu() {
  awk -F'\t' -v m="$1" -v hz="$clk_tck" '$2 == m && $3 == "vigil" { t += $5; a += $6; u += $7 }
    END { if (u > 0) printf "%.3f %.3f\n", t * 1000 / hz / u, a * 1000 / hz / u; else print "- -" }' "$results"
}
# p50 / p99 (ms) over every sample of every round
pooled() { # measure target p
  cat "$work/samples/$1.$2".r[0-9]* 2>/dev/null | percentile "$3" | awk '{ if ($1 != "") printf "%.2f", $1 / 1000 }'
}

declare -A MED
table="$work/table.txt"
{
  printf '%-9s %9s  %-20s %9s  %-20s %7s %12s %10s\n' \
    measure "direct" "per round" "vigil" "per round" "v/d" "gw CPU" "audit thr"
  for m in download upload scp scp-sftp; do
    has_measure "$m" || continue
    for t in "${TARGETS[@]}"; do MED[$m.$t]="$(field "$m" "$t" 4 | median)"; done
    read -r cpu audit < <(gw_cpu "$m")
    printf '%-9s %9s  %-20s %9s  %-20s %7s %12s %10s\n' "$m" \
      "${MED[$m.direct]}" "$(per_round "$m" direct)" "${MED[$m.vigil]}" "$(per_round "$m" vigil)" \
      "$(ratio "${MED[$m.vigil]}" "${MED[$m.direct]}")" "$cpu ms/MiB" "$audit"
  done
  echo
  printf '%-9s %9s %9s  %9s %9s  %9s %9s  %-22s %12s %10s\n' \
    measure "direct" "" "vigil" "" "added" "" "vigil p50 per round" "gw CPU" "audit thr"
  printf '%-9s %9s %9s  %9s %9s  %9s %9s\n' "" p50 p99 p50 p99 p50 p99
  for m in exec echo; do
    if ! has_measure "$m" || { [[ "$m" == echo ]] && [[ -n "$echo_note" ]]; }; then
      printf '%-9s %s\n' "$m" "${echo_note:-not measured (not in MEASURES)}"
      continue
    fi
    for t in "${TARGETS[@]}"; do
      MED[$m.$t.p50]="$(pooled "$m" "$t" 0.50)" MED[$m.$t.p99]="$(pooled "$m" "$t" 0.99)"
    done
    MED[$m.add.p50]="$(diff_ms "${MED[$m.vigil.p50]}" "${MED[$m.direct.p50]}")"
    MED[$m.add.p99]="$(diff_ms "${MED[$m.vigil.p99]}" "${MED[$m.direct.p99]}")"
    read -r cpu audit < <(gw_cpu "$m")
    printf '%-9s %9s %9s  %9s %9s  %9s %9s  %-22s %12s %10s\n' "$m" \
      "${MED[$m.direct.p50]}" "${MED[$m.direct.p99]}" "${MED[$m.vigil.p50]}" "${MED[$m.vigil.p99]}" \
      "${MED[$m.add.p50]}" "${MED[$m.add.p99]}" "$(per_round "$m" vigil)" "$cpu ms/op" "$audit"
  done
} >"$table"

echo
echo "== Vigil SSH gateway vs direct: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)), load before $load_before, after $load_after"
echo "   $ROUNDS rounds interleaved; bulk = BULK_MB=$BULK_MB MiB per transfer, MiB/s (median of the rounds, then each round);"
echo "   exec = EXEC_N=$EXEC_N x 'ssh -S CTL HOST true' on a ControlMaster connection; echo = ECHO_N=$ECHO_N keys typed into a login shell on a pty;"
echo "   latencies in ms, p50/p99 over every sample of every round (nearest rank); added = vigil - direct."
echo "   gw CPU = utime+stime of vigil-node per MiB moved (bulk) or per operation (exec, echo) over all rounds;"
echo "   audit thr = the share of it in its vigil-audit thread (records and recordings written). Client, sshd and gateway share the cores."
echo "   $("ssh" -V 2>&1) on both paths (client cipher: $ciphers); the gateway reaches the sshd with russh."
echo "   vigil $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')$( [[ -n "$(git -C "$repo" status --porcelain -- node proto 2>/dev/null)" ]] && echo ' + local changes'), audit on (sync=$AUDIT_SYNC), every channel byte recorded; a fresh gateway per round"
echo
cat "$table"
echo
echo "Goals (reported, not enforced):"
if has_measure download; then
  vd="$(ratio "${MED[download.vigil]}" "${MED[download.direct]}")"
  printf '  download vigil/direct %s (>= %s: %s)\n' "$vd" "$GOAL_DOWNLOAD_RATIO" "$(verdict "$vd" '>=' "$GOAL_DOWNLOAD_RATIO")"
fi
if has_measure exec; then
  printf '  exec added p50 %s ms (<= %s: %s)   added p99 %s ms (<= %s: %s)\n' \
    "${MED[exec.add.p50]}" "$GOAL_EXEC_P50_MS" "$(verdict "${MED[exec.add.p50]}" '<=' "$GOAL_EXEC_P50_MS")" \
    "${MED[exec.add.p99]}" "$GOAL_EXEC_P99_MS" "$(verdict "${MED[exec.add.p99]}" '<=' "$GOAL_EXEC_P99_MS")"
fi
if [[ "$PROFILE" == 1 && -s "$work/perf.data" ]]; then
  echo
  echo "Profile of vigil-node during the last vigil download (perf record -e cpu-clock; self time, top symbols):"
  # (awk reads to the end: no SIGPIPE for perf under pipefail)
  { perf report -i "$work/perf.data" --no-children --sort comm,dso,symbol --stdio 2>/dev/null \
      | awk '/^ +[0-9]+\.[0-9]+%/ && n++ < 25 { sub(/ +$/, ""); print substr($0, 1, 150) }'; } || true
fi
echo
echo "Audit log (vigil audit verify --log, per round; recordings deleted after verification unless KEEP_WORKDIR=1):"
printf '  %s\n' "${verify_lines[@]}"
if [[ -s "$work/eof.tsv" ]]; then
  echo
  echo "Exec with stdin at EOF (ssh -S CTL HOST true </dev/null) on the kept connection, ended without an exit status (ssh exit 255):"
  for t in "${TARGETS[@]}"; do
    awk -F'\t' -v t="$t" '$2 == t { l += $3; n += $4; r = r sep $3 "/" $4; sep = " " }
      END { if (n) printf "  %-6s %d of %d (per round: %s)\n", t, l, n, r }' "$work/eof.tsv"
  done
fi
[[ "$KEEP_WORKDIR" == 1 ]] && echo "Work dir (kept): $work"

((audit_rc == 0)) || die "an audit log does not verify (see above)"
