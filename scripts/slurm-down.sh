#!/usr/bin/env bash
# Stop the SLURM daemons that scripts/slurm-up.sh started, and only those: the PIDs recorded in
# $LCA_SLURM_STATE/pids (default /tmp/lca-slurm/pids). Jobs still in the queue are cancelled first
# so no job step outlives its slurmd. `--keep-munge` leaves munged running (used by slurm-up.sh
# when it restarts SLURM after a configuration change).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # the daemons live in sbin, not always on root's PATH

STATE=${LCA_SLURM_STATE:-/tmp/lca-slurm}
PIDS="$STATE/pids"
keep_munge=0
[[ ${1:-} == --keep-munge ]] && keep_munge=1

# stop NAME: TERM the recorded PID if it still runs NAME, wait up to 15 s, then KILL.
stop() {
    local name=$1 f="$PIDS/$1.pid" pid
    [[ -f $f ]] || return 0
    pid=$(<"$f")
    if [[ -n $pid && -r /proc/$pid/comm && $(</proc/"$pid"/comm) == "$name" ]]; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 30); do
            [[ -r /proc/$pid/comm ]] || break
            sleep 0.5
        done
        if [[ -r /proc/$pid/comm ]]; then
            echo "slurm-down: $name (pid $pid) ignored SIGTERM: killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        echo "slurm-down: stopped $name (pid $pid)"
    fi
    rm -f "$f"
}

if [[ -f $PIDS/slurmctld.pid ]] && command -v squeue >/dev/null; then
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        # shellcheck disable=SC2086  # one job id per word
        scancel $jobs 2>/dev/null || true
        sleep 2
    fi
fi
stop slurmd
stop slurmctld
((keep_munge)) || stop munged
