#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying and testing hydra/launcher=submitit_slurm for real.
#
#   sudo scripts/slurm_local.sh          # install (apt: slurm-wlm, munge) if needed, configure, start; idempotent
#   sudo scripts/slurm_local.sh stop     # stop slurmctld, slurmd and munged
#   sudo scripts/slurm_local.sh status   # exit 0 if the cluster answers and its node is up
#
# No systemd is assumed (containers, CI runners): munged runs as the munge user with /run/munge created here,
# slurmctld and slurmd are started directly. Process tracking is SLURM's /proc walker and tasks are not
# confined (proctrack/linuxproc, task/none), so no cgroups are needed. There is no accounting database
# (sacct answers nothing; submitit warns on each poll and falls back on its result files); finished jobs are
# recorded by jobcomp/filetxt in /var/log/slurm/jobcomp.log. One node (this host, its cores and memory) in
# one partition, `debug`; no GPUs are declared, so a job that asks for one is refused at submission.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
LOG=/var/log/slurm
PARTITION=debug
NODE=$(hostname -s)

say() { echo "slurm_local: $*"; }
die() { echo "error: slurm_local: $*" >&2; exit 1; }

node_up() {
  # idle, mixed or allocated: the node takes jobs (down/drained/unknown states do not)
  local st
  st=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1) || return 1
  [[ "$st" =~ ^(idle|mixed|allocated|completing)$ ]]
}

running() { pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null && scontrol ping >/dev/null 2>&1 && node_up; }

stop() {
  scontrol shutdown >/dev/null 2>&1 || true
  for pidfile in /run/slurmctld.pid /run/slurmd.pid /run/munge/munged.pid; do
    if [ -f "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null || true; rm -f "$pidfile"; fi
  done
  for _ in $(seq 60); do pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break; sleep 0.5; done
  say "stopped"
}

case "${1:-start}" in
  stop) stop; exit 0 ;;
  status) if running; then say "up: partition $PARTITION on $NODE"; exit 0; else say "not running"; exit 1; fi ;;
  start) ;;
  *) die "usage: $0 [start|stop|status]" ;;
esac

if command -v sinfo >/dev/null && running; then
  say "already running: partition $PARTITION on $NODE ($(sinfo -h -o '%c CPUs, %m MB' -n "$NODE"))"
  say "stop it with: $0 stop"
  exit 0
fi

[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and starts system daemons)"

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  say "installing slurm-wlm and munge (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# munge: the key the package made (one is generated if absent), a socket folder that survives no reboot here
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null || \
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  old=$(cat /run/munge/munged.pid 2>/dev/null || true)
  if [ -n "$old" ]; then kill "$old" 2>/dev/null || true; fi
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
  munge -n | unmunge >/dev/null || die "munged did not start (see /var/log/munge/munged.log)"
fi

# The node: this host's cores and memory (leaving 512 MB to the system), declared as-is to slurmd.
cpus=$(nproc)
mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
mem_mb=$((mem_mb > 1024 ? mem_mb - 512 : mem_mb))

install -d -o slurm -g slurm -m 0755 "$LOG" /var/spool/slurmctld
install -d -m 0755 /var/spool/slurmd /etc/slurm
cat > "$CONF" <<EOF
# Written by scripts/slurm_local.sh: a one-node cluster on $NODE.
ClusterName=allconv-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.log
JobRequeue=1
# A job that can never run on this node (more cores, memory or GPUs than it has) is refused by sbatch.
EnforcePartLimits=ALL
ReturnToService=2
SlurmdParameters=config_overrides
# The scheduler's SIGTERM -> SIGKILL grace: a step and a checkpoint must fit in it.
KillWait=30
SchedulerParameters=sched_interval=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

if scontrol ping >/dev/null 2>&1; then scontrol reconfigure >/dev/null 2>&1 || true; else slurmctld; fi
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do node_up && break; sleep 0.5; done
if ! node_up; then
  # a node left down by an earlier run (ReturnToService covers most cases): bring it back once
  scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
  for _ in $(seq 20); do node_up && break; sleep 0.5; done
fi
node_up || die "the node did not come up (sinfo: $(sinfo -h -o '%T %E' 2>&1 | head -1); logs in $LOG)"

say "up: partition $PARTITION on $NODE, $cpus CPUs, $mem_mb MB, no GPUs ($CONF)"
say "try: srun -p $PARTITION hostname"
say "stop it with: $0 stop"
