#!/usr/bin/env bash
# Stop the test cluster started by start.sh: cancel its jobs, then end the
# daemons start.sh recorded in the state directory, by PID only (never by
# process name, so unrelated munged/MariaDB/SLURM processes are untouched).
# Idempotent: nothing running is not an error. State (config, DB, logs) is
# kept; `rm -rf "$SLURMTUNE_TEST_CLUSTER_DIR"` afterwards gives a cold start.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR
source "$HERE/common.sh"

if [[ ! -d "$STATE_DIR" ]]; then
  log "nothing to stop ($STATE_DIR does not exist)"
  exit 0
fi

# Jobs' processes belong to slurmstepd, which outlives slurmd; cancel the jobs
# first so that no job keeps running after the cluster is gone.
if is_running slurmctld && is_running slurmd; then
  jobs="$(squeue -h -o %A 2>/dev/null || true)"
  if [[ -n "$jobs" ]]; then
    log "cancelling jobs: ${jobs//$'\n'/ }"
    # shellcheck disable=SC2086  # one job id per word
    scancel --full $jobs 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do      # up to 10 s (KillWait is 5 s)
      [[ -z "$(squeue -h -t RUNNING,COMPLETING -o %A 2>/dev/null || true)" ]] && break
      sleep 0.1
    done
  fi
fi

# Reverse start order: clients of a daemon go before the daemon.
for name in slurmd slurmctld slurmdbd mariadbd munged; do
  stop_daemon "$name"
done
log "stopped"
