#!/usr/bin/env bash
# A private 2-node SLURM cluster on this one machine, for the real 2-node DeepSpeed test
# (tests/test_deepspeed.py). Each node is a slurmd in its own network, UTS and mount namespace
# (hostnames stn1, stn2 at 10.77.0.1/.2 on a bridge; slurmctld as "stctl" at 10.77.0.254), so
# the ranks of a job really talk across two network stacks, as on two machines.
#
#   bash tests/two_node_cluster.sh start | tail -n 1    # -> export SLURM_CONF=...
#   bash tests/two_node_cluster.sh stop
#
# It leaves the shared test cluster (env/test-cluster) alone, borrowing only its munged
# (start that first). No accounting: sacct does not work here, squeue/scontrol do.
# The nodes see a private /etc/hosts (bind-mounted in their mount namespace); the machine's
# own /etc/hosts is not touched. Needs root, iproute2 and util-linux' unshare.
set -euo pipefail

STATE="${SLURMTUNE_2NODE_DIR:-/tmp/slurmtune-2node}"
MUNGE_SOCKET="${SLURMTUNE_TEST_CLUSTER_DIR:-/tmp/slurmtune-test-cluster}/munge/munge.socket"
NET=10.77.0
CONF="$STATE/slurm.conf"

log() { echo "[two-node] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

in_node() {  # in_node NAME COMMAND...: run in that node's namespaces with its hostname and hosts file
  local name="$1"; shift
  local netns=()
  # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup mount slurmd checks for
  [[ "$name" != stctl ]] && netns=(nsenter "--net=/run/netns/$name")
  "${netns[@]}" unshare --uts --mount sh -c \
    "hostname $name && mount --bind '$STATE/hosts' /etc/hosts && exec \"\$@\"" sh "$@"
}

network() {
  ip link show st-br >/dev/null 2>&1 && return 0
  ip link add st-br type bridge
  ip addr add "$NET.254/24" dev st-br
  ip link set st-br up
  for n in 1 2; do
    ip netns add "stn$n"
    ip link add "st-h$n" type veth peer name stnet0 netns "stn$n"
    ip link set "st-h$n" master st-br up
    ip -n "stn$n" addr add "$NET.$n/24" dev stnet0
    ip -n "stn$n" link set stnet0 up
    ip -n "stn$n" link set lo up
  done
}

config() {
  mkdir -p "$STATE/spool" "$STATE/log" "$STATE/ctld"
  printf '127.0.0.1 localhost\n%s.254 stctl\n%s.1 stn1\n%s.2 stn2\n' "$NET" "$NET" "$NET" >"$STATE/hosts"
  cat >"$CONF" <<EOF
ClusterName=slurmtune2
SlurmctldHost=stctl($NET.254)
SlurmctldPort=7817
SlurmdPort=7818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
KillWait=5
MinJobAge=300
JobRequeue=1
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=stn1 NodeAddr=$NET.1 CPUs=4 RealMemory=16384 State=UNKNOWN
NodeName=stn2 NodeAddr=$NET.2 CPUs=4 RealMemory=16384 State=UNKNOWN
PartitionName=two Nodes=stn[1-2] Default=YES MaxTime=30 State=UP
EOF
}

running() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  [[ "$(id -u)" -eq 0 ]] || die "must run as root"
  [[ -S "$MUNGE_SOCKET" ]] || die "no munged at $MUNGE_SOCKET: start env/test-cluster/start.sh first"
  stop  # daemons left from an earlier start may trust another munged: always begin afresh
  network
  config
  running "$STATE/slurmctld.pid" || in_node stctl slurmctld -f "$CONF"
  for n in 1 2; do
    mkdir -p "$STATE/spool/stn$n"
    running "$STATE/slurmd-stn$n.pid" || in_node "stn$n" slurmd -f "$CONF" -N "stn$n"
  done
  local deadline=$((SECONDS + 60))
  until [[ "$(SLURM_CONF="$CONF" sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE ' (idle|mix|alloc)$')" -eq 2 ]]; do
    ((SECONDS < deadline)) || die "nodes not up after 60 s: $(SLURM_CONF="$CONF" sinfo -N 2>&1 | tail -n 3)"
    sleep 0.5
  done
  log "2 nodes up: $(SLURM_CONF="$CONF" sinfo -h -N -o '%N:%t' | tr '\n' ' ')"
  echo "export SLURM_CONF=$CONF"
}

stop() {
  local pid deadline
  for pid in "$STATE"/slurmd-stn*.pid "$STATE/slurmctld.pid"; do
    running "$pid" || continue
    kill "$(cat "$pid")"
    deadline=$((SECONDS + 15))
    while running "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
    log "stopped $(basename "$pid" .pid)"
  done
  for n in 1 2; do ip netns del "stn$n" 2>/dev/null || true; done
  ip link del st-br 2>/dev/null || true
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  *) die "usage: $0 start|stop" ;;
esac
