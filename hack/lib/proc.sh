# shellcheck shell=bash
# What every hack/ script needs: its log prefix, its usage text, waiting for a condition, and
# processes tracked by pid file (never by pattern: a pattern also matches other people's
# processes, and a pid file names exactly the one this script started).
#
# Source it after setting LOG_TAG (the prefix of log lines), e.g.
#   LOG_TAG=control-plane; . "$HERE/lib/proc.sh"

# With LOG_TIMESTAMPS set, each line carries the time of day (long-running scripts).
log() {
  if [ -n "${LOG_TIMESTAMPS:-}" ]; then
    echo "${LOG_TAG:-$(basename "$0" .sh)}: $(date +%T) $*" >&2
  else
    echo "${LOG_TAG:-$(basename "$0" .sh)}: $*" >&2
  fi
}

# usage: prints the script's header comment (the lines after the shebang, up to the first line
# that is not a comment), the one place its usage is written, and exits 2.
usage() {
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0" >&2
  exit 2
}

# wait_for WHAT SECONDS CMD...: runs CMD every half second until it succeeds; fails after SECONDS,
# or as soon as WATCH_PID (if set) has exited. CMD's output is not shown: it is a probe.
wait_for() {
  local what=$1 secs=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || { log "$what: not ready after ${secs}s"; return 1; }
    if [ -n "${WATCH_PID:-}" ] && ! kill -0 "$WATCH_PID" 2>/dev/null; then
      log "owner $WATCH_PID exited"
      return 1
    fi
    sleep 0.5
  done
}

# pid_alive FILE: the process FILE names is running.
pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# pid_stop FILE: stops the process FILE names (SIGTERM, up to 2 s, then SIGKILL), reaps it if it
# is this shell's child, and removes FILE. A FILE that does not exist is nothing to do.
pid_stop() {
  [ -f "$1" ] || return 0
  local pid; pid=$(cat "$1")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    # Quietly: the shell would otherwise report the SIGKILL of its own child on stderr.
    { kill -9 "$pid"; wait "$pid"; } 2>/dev/null || true
  fi
  rm -f "$1"
}
