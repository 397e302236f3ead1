#!/usr/bin/env bash
# A Docker engine for the Compose stack and its test, on machines where none runs (a CI
# machine, a container without systemd):
#
#   deploy/compose/engine.sh start|stop|status
#
#   start   if `docker info` answers, does nothing (an engine someone else runs is used as it
#           is); otherwise starts dockerd (from the docker.io package: deploy/dev/setup.sh
#           installs it) in the background, records its PID, and waits until it answers.
#   stop    stops the dockerd this script started (by its PID file), with its containers;
#           an engine it did not start is left alone.
#   status  exit 0 when an engine answers (and says whose), 3 otherwise.
#
# The dockerd started here leaves the host's firewall and forwarding alone (--iptables=false
# --ip-forward=false): on a shared machine it must not switch the FORWARD policy to DROP or turn
# on forwarding under other people's network namespaces. Containers on one Compose network
# still reach each other (one bridge), and published ports work through Docker's userland proxy;
# containers get no route out, which the stack does not need (images are built with
# --network host).
#   VIGIL_DOCKERD_DIR   PID file and log (default /var/run/vigil-dockerd)
set -euo pipefail
state="${VIGIL_DOCKERD_DIR:-/var/run/vigil-dockerd}"
pidfile="$state/dockerd.pid"
logfile="$state/dockerd.log"

log() { printf 'engine.sh: %s\n' "$*" >&2; }
die() { printf 'engine.sh: ERROR: %s\n' "$*" >&2; exit 1; }

answers() { docker info >/dev/null 2>&1; }
ours() {
  [[ -f "$pidfile" ]] || return 1
  local pid; pid="$(cat "$pidfile")"
  [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == dockerd ]]
}

case "${1:-}" in
  start)
    if answers; then
      if ours; then log "dockerd already running (pid $(cat "$pidfile"), started by this script)"
      else log "a Docker engine already answers; using it"; fi
      exit 0
    fi
    [[ "$(id -u)" == 0 ]] || die "run as root (dockerd)"
    command -v dockerd >/dev/null || die "dockerd not found (apt-get install docker.io; deploy/dev/setup.sh installs it)"
    ! ours || die "dockerd (pid $(cat "$pidfile")) runs but does not answer; see $logfile"
    mkdir -p "$state"
    log "starting dockerd (log $logfile)"
    setsid dockerd --iptables=false --ip-forward=false </dev/null >>"$logfile" 2>&1 &
    printf '%s\n' "$!" >"$pidfile"
    for _ in $(seq 1 120); do
      answers && { log "dockerd ready (pid $(cat "$pidfile"))"; exit 0; }
      ours || break
      sleep 0.5
    done
    tail -20 "$logfile" >&2
    die "dockerd did not come up"
    ;;
  stop)
    if ! ours; then
      rm -f "$pidfile"
      log "no dockerd started by this script runs"
      exit 0
    fi
    pid="$(cat "$pidfile")"
    log "stopping dockerd (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq 1 60); do
      [[ -d "/proc/$pid" ]] || break
      sleep 0.5
    done
    if [[ -d "/proc/$pid" ]]; then
      log "dockerd did not exit within 30 s; SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    ;;
  status)
    if answers; then
      if ours; then echo "dockerd running (pid $(cat "$pidfile"), started by $0)"
      else echo "a Docker engine answers (not started by $0)"; fi
    else
      echo "no Docker engine answers"; exit 3
    fi
    ;;
  *) printf 'usage: %s start|stop|status\n' "$0" >&2; exit 2 ;;
esac
