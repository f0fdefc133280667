#!/usr/bin/env bash
# Start (idempotently) a single-node SLURM 22.05 cluster on localhost for tests:
# munged, MariaDB, slurmdbd, slurmctld and slurmd, all with their state under
# $SLURMTUNE_TEST_CLUSTER_DIR (default /tmp/slurmtune-test-cluster).
#
# Daemons already running are left alone, so a second run only checks health.
# The last line of stdout is always `export SLURM_CONF=<path>` on success
# (tests/slurm_cluster.py parses it). On failure it exits non-zero and prints
# the tail of the relevant daemon log to stderr.
#
# Must run as root (installs packages, daemons and jobs run as root).
# Env: SLURMTUNE_TEST_CLUSTER_DIR   state directory
#      SLURMTUNE_TEST_CLUSTER_TIMEOUT  seconds to wait for the daemons (default 90)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR
source "$HERE/common.sh"

WAIT_S="${SLURMTUNE_TEST_CLUSTER_TIMEOUT:-90}"
MYSQL_PORT=3306
MYSQL_SOCKET="$RUN_DIR/mariadbd.sock"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
HOST="$(hostname -s)"
CLUSTER=slurmtune   # must match ClusterName in slurm.conf.in

die() {
  echo "[test-cluster] ERROR: $1" >&2
  local name="${2:-}" file
  if [[ -n "$name" ]]; then
    for file in "${LOG_FILE[$name]:-$LOG_DIR/$name.log}" "$LOG_DIR/$name.out"; do
      if [[ -s "$file" ]]; then
        echo "----- last lines of $file -----" >&2
        tail -n 40 "$file" >&2
      fi
    done
  fi
  exit 1
}

[[ "$(id -u)" -eq 0 ]] || die "must run as root"

# ---------------------------------------------------------------- packages
install_packages() {
  local bin missing=()
  for bin in munged munge slurmctld slurmd slurmdbd sbatch sacct sacctmgr \
             mariadbd mariadb-install-db mariadb mariadb-admin; do
    command -v "$bin" >/dev/null || missing+=("$bin")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  log "installing packages (missing: ${missing[*]})"

  # There is no init system: keep the packages' maintainer scripts from
  # starting the system munged/MariaDB/SLURM services (101 = "not allowed").
  # We start private instances below instead.
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    created_policy=1
  fi
  local rc=0
  {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq &&
      apt-get install -y -qq --no-install-recommends \
        slurm-wlm munge slurmdbd mariadb-server mariadb-client
  } >"$STATE_DIR/apt.log" 2>&1 || rc=$?
  [[ "$created_policy" -eq 1 ]] && rm -f "$policy"
  if [[ "$rc" -ne 0 ]]; then
    tail -n 30 "$STATE_DIR/apt.log" >&2
    die "apt-get install failed (see $STATE_DIR/apt.log)"
  fi
}

# ---------------------------------------------------------------- config
# Render a template from this directory to $2 with mode $3. Returns 0 when
# the file content changed (or is new), 1 when it was already up to date.
render() {
  local template="$HERE/$1" dest="$2" mode="$3" tmp
  tmp="$(mktemp "$dest.XXXXXX")"
  sed -e "s|@HOST@|$HOST|g" \
      -e "s|@STATE_DIR@|$STATE_DIR|g" \
      -e "s|@RUN_DIR@|$RUN_DIR|g" \
      -e "s|@LOG_DIR@|$LOG_DIR|g" \
      -e "s|@MUNGE_SOCKET@|$MUNGE_SOCKET|g" \
      -e "s|@MYSQL_PORT@|$MYSQL_PORT|g" \
      -e "s|@DB_PASS@|$DB_PASS|g" \
      "$template" >"$tmp"
  if grep -q '@[A-Z_][A-Z_]*@' "$tmp"; then
    rm -f "$tmp"
    die "unfilled placeholder in $template"
  fi
  chmod "$mode" "$tmp"
  if cmp -s "$tmp" "$dest"; then
    rm -f "$tmp"
    return 1
  fi
  mv -f "$tmp" "$dest"
  return 0
}

write_config() {
  mkdir -p "$ETC_DIR" "$RUN_DIR" "$LOG_DIR" "$STATE_DIR/dev" \
           "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd"
  # Fake GPUs: slurmd only accepts character devices in gres.conf File=.
  ln -sfn /dev/null "$STATE_DIR/dev/nvidia0"
  ln -sfn /dev/null "$STATE_DIR/dev/nvidia1"

  # Password of the MariaDB user slurmdbd connects as (MariaDB listens on
  # 127.0.0.1 only; random so nothing guessable sits in a world-readable place).
  if [[ ! -s "$ETC_DIR/db.pass" ]]; then
    (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$ETC_DIR/db.pass")
  fi
  DB_PASS="$(cat "$ETC_DIR/db.pass")"

  # A changed config only takes effect on restart: stop what reads it, the
  # start functions below bring it back.
  local slurm_changed=0
  render slurm.conf.in "$ETC_DIR/slurm.conf" 644 && slurm_changed=1
  render gres.conf.in "$ETC_DIR/gres.conf" 644 && slurm_changed=1
  if render slurmdbd.conf.in "$ETC_DIR/slurmdbd.conf" 600; then
    if is_running slurmdbd; then
      log "slurmdbd.conf changed, restarting slurmdbd"
      stop_daemon slurmdbd
    fi
  fi
  if [[ "$slurm_changed" -eq 1 ]] && { is_running slurmd || is_running slurmctld; }; then
    log "slurm.conf/gres.conf changed, restarting slurmctld and slurmd"
    stop_daemon slurmd
    stop_daemon slurmctld
  fi
  return 0
}

# ---------------------------------------------------------------- waiting
DEADLINE=0   # set once the packages are installed
ACTED=0      # 1 once anything was started or created

# wait_for <daemon> <what> <command...>: retry the command until it succeeds;
# give up (with the daemon's log) at DEADLINE or as soon as the daemon died.
wait_for() {
  local name="$1" what="$2"
  shift 2
  until "$@" >/dev/null 2>&1; do
    is_running "$name" || die "$name exited while waiting for $what" "$name"
    ((SECONDS < DEADLINE)) || die "timed out waiting for $what" "$name"
    sleep 0.3
  done
}

# ---------------------------------------------------------------- daemons
# Every daemon is started with stdin/stdout/stderr away from this script
# (a caller capturing our output must not wait on daemons holding the pipe)
# and without fd 9, the lock below.

# A daemon writes its pid file a moment after it was launched (after forking
# into the background); wait for that before judging it by is_running.
await_pid() {
  local name="$1" i
  for ((i = 0; i < 100; i++)); do        # up to 10 s
    is_running "$name" && return 0
    sleep 0.1
  done
  die "$name did not start" "$name"
}

munge_works() { munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET"; }

start_munged() {
  is_running munged && return 0
  log "starting munged"
  ACTED=1
  # munged refuses to run as root and checks that its key, socket and log
  # directory are owned by its user and not writable by others.
  install -d -o munge -g munge -m 0755 "$MUNGE_DIR"
  if [[ ! -s "$MUNGE_DIR/munge.key" ]]; then
    head -c 1024 /dev/urandom >"$MUNGE_DIR/munge.key"
  fi
  chown munge:munge "$MUNGE_DIR/munge.key"
  chmod 0400 "$MUNGE_DIR/munge.key"
  runuser -u munge -- munged \
    --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
    --pid-file="${PID_FILE[munged]}" --log-file="${LOG_FILE[munged]}" \
    --seed-file="$MUNGE_DIR/munged.seed" \
    </dev/null >>"$LOG_DIR/munged.out" 2>&1 9>&- ||
    die "munged failed to start" munged
  await_pid munged
  wait_for munged "munged to answer" munge_works
}

mysql_root() { mariadb --no-defaults -S "$MYSQL_SOCKET" -u root; }

start_mariadb() {
  is_running mariadbd && return 0
  if [[ ! -d "$MYSQL_DIR/mysql" ]]; then
    log "initialising MariaDB data directory"
    rm -rf "$MYSQL_DIR"
    mkdir -p "$MYSQL_DIR"
    mariadb-install-db --no-defaults --user=root --datadir="$MYSQL_DIR" \
      --auth-root-authentication-method=socket --skip-test-db \
      >"$LOG_DIR/mariadb-install-db.log" 2>&1 9>&- ||
      die "mariadb-install-db failed (see $LOG_DIR/mariadb-install-db.log)" mariadb-install-db
  fi
  log "starting MariaDB on 127.0.0.1:$MYSQL_PORT"
  ACTED=1
  # mariadbd does not daemonize itself: setsid detaches it from our session
  # so a Ctrl-C aimed at the caller does not kill it. The InnoDB sizes are
  # the least slurmdbd accepts without logging an error (memory is only
  # touched as used). Native AIO is off: sandboxed kernels (gVisor) may not
  # offer it, and a tiny test DB gains nothing from it.
  setsid mariadbd --no-defaults --user=root --datadir="$MYSQL_DIR" \
    --bind-address=127.0.0.1 --port="$MYSQL_PORT" --socket="$MYSQL_SOCKET" \
    --pid-file="${PID_FILE[mariadbd]}" --log-error="${LOG_FILE[mariadbd]}" \
    --skip-name-resolve --skip-log-bin --innodb-use-native-aio=0 \
    --innodb-buffer-pool-size=512M --innodb-lock-wait-timeout=900 \
    </dev/null >>"$LOG_DIR/mariadbd.out" 2>&1 9>&- &
  await_pid mariadbd
  wait_for mariadbd "MariaDB to accept connections" \
    mariadb-admin --no-defaults -S "$MYSQL_SOCKET" -u root ping
}

start_slurmdbd() {
  is_running slurmdbd && return 0
  # (Re)create the DB user slurmdbd logs in as; cheap and idempotent, and it
  # keeps the password in step with etc/db.pass.
  mysql_root <<SQL || die "could not create the slurm DB user" mariadbd
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL
  log "starting slurmdbd"
  ACTED=1
  # slurmdbd finds slurmdbd.conf next to $SLURM_CONF.
  slurmdbd </dev/null >>"$LOG_DIR/slurmdbd.out" 2>&1 9>&- ||
    die "slurmdbd failed to start" slurmdbd
  await_pid slurmdbd
  wait_for slurmdbd "slurmdbd to answer" sacctmgr -n show cluster
}

start_slurmctld() {
  is_running slurmctld && return 0
  log "starting slurmctld"
  ACTED=1
  slurmctld </dev/null >>"$LOG_DIR/slurmctld.out" 2>&1 9>&- ||
    die "slurmctld failed to start" slurmctld
  await_pid slurmctld
}

start_slurmd() {
  is_running slurmd && return 0
  log "starting slurmd"
  ACTED=1
  slurmd </dev/null >>"$LOG_DIR/slurmd.out" 2>&1 9>&- ||
    die "slurmd failed to start" slurmd
  await_pid slurmd
}

ctld_up() { scontrol ping | grep -q 'is UP'; }
cluster_registered() { sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; }

# Wait until the node takes jobs. idle is what a fresh cluster shows; mixed,
# allocated or completing mean another test process is using it, also fine.
wait_node_ready() {
  local state resumed=0
  while true; do
    is_running slurmctld || die "slurmctld exited" slurmctld
    is_running slurmd || die "slurmd exited" slurmd
    state="$(sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n 1 || true)"
    case "$state" in
      idle | mixed | allocated | completing) return 0 ;;
      inval*) die "node $HOST is INVAL (config does not match the node)" slurmctld ;;
      drain* | down)
        # A state left over from an earlier run (e.g. a job that could not be
        # killed); the node itself is answering, so put it back into service.
        if [[ "$resumed" -eq 0 ]]; then
          log "node $HOST is $state, resuming it"
          scontrol update nodename="$HOST" state=resume || true
          resumed=1
        fi ;;
    esac
    ((SECONDS < DEADLINE)) || die "timed out waiting for node $HOST to become idle (state: ${state:-none})" slurmd
    sleep 0.3
  done
}

# Account and QOS the project's tests submit with. Associations are not
# enforced (AccountingStorageEnforce unset), so other jobs are unaffected.
setup_accounting() {
  if sacctmgr -n -P show assoc where cluster="$CLUSTER" user=root account=testacct format=qos |
      grep -q campus-gpu; then
    return 0
  fi
  log "creating account testacct and qos campus-gpu"
  ACTED=1
  if ! sacctmgr -n -P show account testacct format=account | grep -qx testacct; then
    sacctmgr -i add account testacct cluster="$CLUSTER" \
      description="slurmtune tests" organization=slurmtune >/dev/null
  fi
  if ! sacctmgr -n -P show qos campus-gpu format=name | grep -qx campus-gpu; then
    sacctmgr -i add qos campus-gpu >/dev/null
  fi
  if ! sacctmgr -n -P show assoc where cluster="$CLUSTER" user=root account=testacct format=user |
      grep -qx root; then
    sacctmgr -i add user root account=testacct cluster="$CLUSTER" >/dev/null
  fi
  sacctmgr -i modify user root where cluster="$CLUSTER" set qos+=campus-gpu >/dev/null
}

# ---------------------------------------------------------------- main
mkdir -p "$STATE_DIR"
# Serialise concurrent callers (e.g. several test processes starting at once).
exec 9>"$STATE_DIR/.start.lock"
flock -w 900 9 || die "could not lock $STATE_DIR/.start.lock"

install_packages
DEADLINE=$((SECONDS + WAIT_S))
write_config

start_munged
start_mariadb
start_slurmdbd
start_slurmctld
wait_for slurmctld "slurmctld to answer" ctld_up
start_slurmd
wait_node_ready
# slurmctld registers the cluster in slurmdbd on its first start.
wait_for slurmctld "the cluster to register in slurmdbd" cluster_registered
setup_accounting
wait_for slurmdbd "sacct to answer" sacct -n -X -j 1 -o JobID

# Say more than the export line only when something had to be done.
if [[ "$ACTED" -eq 1 ]]; then
  log "cluster up: node $HOST, state dir $STATE_DIR, logs in $LOG_DIR"
fi
echo "export SLURM_CONF=$SLURM_CONF"
