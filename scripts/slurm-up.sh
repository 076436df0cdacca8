#!/usr/bin/env bash
# Bring up a single-node SLURM (munged + slurmctld + slurmd) on this machine, for tests and demos.
#
# Run as root on Debian/Ubuntu with `slurm-wlm` and `munge` installed
# (apt-get install -y --no-install-recommends slurm-wlm munge). No systemd needed: the daemons run
# in the foreground under setsid, their PIDs go to $LCA_SLURM_STATE/pids/<name>.pid, and
# scripts/slurm-down.sh stops exactly those. Idempotent: daemons already running from an earlier
# call are kept if the generated slurm.conf did not change.
#
# The node needs no cgroups (proctrack/linuxproc, task/none, no accounting), so this works inside
# containers. Memory is not a consumable resource (CR_CPU), so jobs share the node's memory and
# only CPUs limit how many run at once.
#
# Environment: LCA_SLURM_STATE (default /tmp/lca-slurm), SLURM_CONF (default /etc/slurm/slurm.conf),
# LCA_SLURM_TIMEOUT seconds to wait for the node and the test job (default 90).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # the daemons live in sbin, not always on root's PATH

STATE=${LCA_SLURM_STATE:-/tmp/lca-slurm}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
TIMEOUT=${LCA_SLURM_TIMEOUT:-90}
PIDS="$STATE/pids"
LOGS="$STATE/log"
SPOOL=/var/spool/slurm

die() {
    echo "slurm-up: error: $*" >&2
    exit 1
}

# Last lines of every daemon log, so a failure explains itself without a second command.
log_tails() {
    local f
    for f in "$LOGS"/*.log /var/log/munge/munged.log; do
        [[ -f $f ]] || continue
        echo "----- tail $f" >&2
        tail -n 25 "$f" >&2
    done
}

fail() {
    echo "slurm-up: error: $*" >&2
    log_tails
    exit 1
}

[[ $(id -u) == 0 ]] || die "must run as root (it writes $CONF and starts daemons): sudo $0"
for exe in munged slurmctld slurmd sinfo sbatch; do
    command -v "$exe" >/dev/null ||
        die "$exe not found: apt-get install -y --no-install-recommends slurm-wlm munge"
done

# alive NAME: the recorded PID exists and still runs the recorded program.
alive() {
    local f="$PIDS/$1.pid" pid
    [[ -f $f ]] || return 1
    pid=$(<"$f")
    [[ -n $pid && -r /proc/$pid/comm ]] || return 1
    [[ $(</proc/"$pid"/comm) == "$1" ]]
}

# start NAME LOGFILE CMD...: start a foreground daemon in its own session, record its PID.
# Inside a script a background job is never a process-group leader, so setsid execs in place and
# $! is the daemon itself.
start() {
    local name=$1 log=$2
    shift 2
    setsid "$@" </dev/null >>"$log" 2>&1 &
    echo $! >"$PIDS/$name.pid"
    sleep 1
    alive "$name" || fail "$name exited right after starting (log: $log)"
    echo "slurm-up: started $name (pid $(<"$PIDS/$name.pid"))"
}

mkdir -p "$PIDS" "$LOGS" "$SPOOL/ctld" "$SPOOL/d" "$(dirname "$CONF")"

# ---- slurm.conf --------------------------------------------------------------------------------
host=$(hostname -s)
cpus=$(nproc)
mem_total=$(free -m | awk '/^Mem:/ {print $2}')
# Keep a margin for the OS and the daemons; slurmd drains a node that reports less than configured.
margin=$((mem_total / 10 > 512 ? mem_total / 10 : 512))
real_mem=$((mem_total - margin))
((real_mem > 256)) || die "only ${mem_total} MB of memory: a SLURM node needs more than $((margin + 256)) MB"

new_conf=$(
    cat <<EOF
# Written by lca-replay scripts/slurm-up.sh: a single-node cluster for tests. Safe to delete.
ClusterName=lca
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldPidFile=$STATE/slurmctld.pidfile
SlurmdPidFile=$STATE/slurmd.pidfile
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
InactiveLimit=0
KillWait=5
MinJobAge=300
SlurmdTimeout=120
Waittime=0
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${real_mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)

conf_changed=1
if [[ -f $CONF ]] && [[ $(<"$CONF") == "$new_conf" ]]; then
    conf_changed=0
fi
if ((conf_changed)); then
    if alive slurmctld || alive slurmd; then
        echo "slurm-up: $CONF changed: restarting the SLURM daemons started earlier"
        "$(dirname "$0")/slurm-down.sh" --keep-munge
    fi
    printf '%s\n' "$new_conf" >"$CONF"
    echo "slurm-up: wrote $CONF (node $host, $cpus CPUs, ${real_mem} MB)"
fi

# ---- munge --------------------------------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key
    echo "slurm-up: created /etc/munge/munge.key"
fi
chown munge:munge /etc/munge /etc/munge/munge.key
chmod 700 /etc/munge
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
chmod 755 /run/munge

if alive munged; then
    :
elif munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    # A munged we did not start (e.g. from the package's init script) works: use it, never stop it.
    echo "slurm-up: using the munged already running"
else
    # munged refuses to run as root; setpriv execs in place, so the recorded PID stays right.
    start munged /var/log/munge/munged.log \
        setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground
fi
for _ in $(seq 20); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.5
done
munge -n | unmunge >/dev/null 2>&1 || fail "munge does not work (munge -n | unmunge)"

# ---- slurmctld, slurmd ---------------------------------------------------------------------------
if ! alive slurmctld; then
    if pgrep -x slurmctld >/dev/null; then
        die "a slurmctld not started by this script runs (pid $(pgrep -x slurmctld | tr '\n' ' ')): stop it first"
    fi
    start slurmctld "$LOGS/slurmctld.out" slurmctld -D -f "$CONF"
fi
if ! alive slurmd; then
    if pgrep -x slurmd >/dev/null; then
        die "a slurmd not started by this script runs (pid $(pgrep -x slurmd | tr '\n' ' ')): stop it first"
    fi
    start slurmd "$LOGS/slurmd.out" slurmd -D -f "$CONF"
fi

# ---- wait for the node, then prove a job runs ------------------------------------------------------
deadline=$((SECONDS + TIMEOUT))
state=""
while ((SECONDS < deadline)); do
    state=$(sinfo -h -N -n "$host" -o '%t' 2>/dev/null | head -n1 || true)
    case $state in
    idle | mix | alloc) break ;;
    drain* | down* | inval* | fail*)
        # ReturnToService=2 revives a node that registers fine; nudge it in case it was left down.
        scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
        ;;
    esac
    sleep 1
done
[[ $state =~ ^(idle|mix|alloc)$ ]] ||
    fail "node $host not ready after ${TIMEOUT}s (sinfo state '${state:-none}'; scontrol show node $host)"

probe="$STATE/probe.out"
rm -f "$probe"
jobid=$(sbatch --parsable --job-name=lca-probe --output="$probe" --time=1 --wrap 'hostname') ||
    fail "sbatch of the probe job failed"
jobid=${jobid%%;*}
while ((SECONDS < deadline)); do
    if [[ -z $(squeue -h -j "$jobid" 2>/dev/null) ]]; then break; fi
    sleep 1
done
if [[ ! -s $probe ]]; then
    scancel "$jobid" 2>/dev/null || true
    fail "probe job $jobid did not complete within ${TIMEOUT}s (no output in $probe)"
fi
echo "slurm-up: ready: node $host idle, probe job $jobid ran on $(<"$probe")"
echo "slurm-up: PIDs in $PIDS, logs in $LOGS; stop with scripts/slurm-down.sh"
