# shellcheck shell=bash disable=SC2034  # variables are used by the sourcing scripts
# Shared by start.sh and stop.sh (sourced, not executed).
#
# Everything the test cluster owns lives under one state directory so that a
# cold start is simply `stop.sh && rm -rf "$STATE_DIR"`.

STATE_DIR="${SLURMTUNE_TEST_CLUSTER_DIR:-/tmp/slurmtune-test-cluster}"
ETC_DIR="$STATE_DIR/etc"          # slurm.conf, gres.conf, slurmdbd.conf
RUN_DIR="$STATE_DIR/run"          # pid files (munged keeps its own in MUNGE_DIR)
LOG_DIR="$STATE_DIR/log"
MUNGE_DIR="$STATE_DIR/munge"      # owned by the munge user: key, socket, pid, log
MYSQL_DIR="$STATE_DIR/mysql"      # private MariaDB data directory

export SLURM_CONF="$ETC_DIR/slurm.conf"
# Root's PATH from a venv or pytest may lack the sbin directories.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

# daemon name -> pid file. The name is also what /proc/PID/comm must say, which
# guards against a stale pid file pointing at a recycled, unrelated PID.
declare -A PID_FILE=(
  [munged]="$MUNGE_DIR/munged.pid"
  [mariadbd]="$RUN_DIR/mariadbd.pid"
  [slurmdbd]="$RUN_DIR/slurmdbd.pid"
  [slurmctld]="$RUN_DIR/slurmctld.pid"
  [slurmd]="$RUN_DIR/slurmd.pid"
)
declare -A LOG_FILE=(
  [munged]="$MUNGE_DIR/munged.log"
  [mariadbd]="$LOG_DIR/mariadbd.log"
  [slurmdbd]="$LOG_DIR/slurmdbd.log"
  [slurmctld]="$LOG_DIR/slurmctld.log"
  [slurmd]="$LOG_DIR/slurmd.log"
)

log() { echo "[test-cluster] $*"; }

# Print the PID of a daemon we started if it is still running, else nothing.
daemon_pid() {
  local name="$1" file="${PID_FILE[$1]}" pid comm
  [[ -r "$file" ]] || return 0
  pid="$(tr -dc '0-9' 2>/dev/null <"$file" || true)"   # may vanish meanwhile
  [[ -n "$pid" ]] || return 0
  comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
  # comm is truncated to 15 characters; our names are shorter.
  [[ "$comm" == "$name" ]] || return 0
  # A zombie (exited, not yet reaped by PID 1) is not running.
  [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]] || return 0
  echo "$pid"
}

is_running() { [[ -n "$(daemon_pid "$1")" ]]; }

# Stop one daemon by its recorded PID: SIGTERM, then SIGKILL after a grace time.
stop_daemon() {
  local name="$1" pid i
  pid="$(daemon_pid "$name")"
  if [[ -z "$pid" ]]; then
    rm -f "${PID_FILE[$name]}"
    return 0
  fi
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do           # up to 15 s
    is_running "$name" || break
    sleep 0.1
  done
  if is_running "$name"; then
    log "$name did not exit on SIGTERM, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.5
  fi
  rm -f "${PID_FILE[$name]}"
}
