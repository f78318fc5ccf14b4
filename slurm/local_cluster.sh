#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for development and tests.
#
#   bash slurm/local_cluster.sh start|stop|status|env
#
# start   installs the Debian packages if missing (root), writes slurm.conf for this host, starts
#         munged, slurmctld and slurmd in the background (no systemd, no cgroups) and waits until
#         the node is idle. Idempotent: starting a running cluster only checks it.
# stop    stops the daemons this script started (by their pid files).
# status  prints the daemons, the node and the partitions; exit 1 when the cluster is not up.
# env     prints `export SLURM_CONF=...` for clients (eval "$(bash slurm/local_cluster.sh env)").
#
# Settings (environment):
#   ARCHSCALE_SLURM_DIR   state, logs and config (default /tmp/archscale-slurm)
#   ARCHSCALE_SLURM_CPUS  CPUs the node declares, more than the hardware is fine (default 8)
#   ARCHSCALE_SLURM_GPUS  GPUs the node declares (default: the NVIDIA devices present, else 2
#                         count-only "GPUs" so multi-task launches can be rehearsed on a CPU)
#
# No slurmdbd: accounting_storage/none + jobcomp/filetxt, so `sacct -c` reads finished jobs'
# states and exit codes from a text file. Facts behind the settings: ../shared/notes/slurm.md.
set -euo pipefail

BASE=${ARCHSCALE_SLURM_DIR:-/tmp/archscale-slurm}
CPUS=${ARCHSCALE_SLURM_CPUS:-8}
CONF=$BASE/etc/slurm.conf
HOST=$(hostname -s)
MARK="# written by archscale slurm/local_cluster.sh"
export SLURM_CONF=$CONF

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

running() {  # running NAME: the daemon whose pid file is $BASE/run/NAME.pid is alive
  local f=$BASE/run/$1.pid
  [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION CMD...: poll CMD every 0.2 s
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.2
  done
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
     && command -v sbatch >/dev/null && command -v munged >/dev/null; then
    return
  fi
  [ "$(id -u)" = 0 ] || die "Slurm is not installed and installing it needs root"
  command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get"
  log "installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

gpu_count() {
  if [ -n "${ARCHSCALE_SLURM_GPUS:-}" ]; then echo "$ARCHSCALE_SLURM_GPUS"; return; fi
  local n; n=$(ls /dev 2>/dev/null | grep -c '^nvidia[0-9][0-9]*$' || true)
  if [ "$n" -gt 0 ]; then echo "$n"; else echo 2; fi
}

write_config() {
  mkdir -p "$BASE"/{etc,run,log,state/ctld,state/d}
  local gpus mem gres_node="" gres_types=""
  gpus=$(gpu_count)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)  # MiB, some left for the OS
  if [ "$gpus" -gt 0 ]; then
    gres_types="GresTypes=gpu"
    gres_node="Gres=gpu:$gpus"
    if [ -e /dev/nvidia0 ] && [ -z "${ARCHSCALE_SLURM_GPUS:-}" ]; then
      echo "NodeName=$HOST Name=gpu File=/dev/nvidia[0-$((gpus - 1))]" >"$BASE/etc/gres.conf"
    else  # stand-in device files: enough to rehearse one task per GPU on a CPU machine
      mkdir -p "$BASE/dev"
      for ((i = 0; i < gpus; i++)); do  # a character device (like /dev/null) keeps slurmd quiet
        [ -e "$BASE/dev/gpu$i" ] || mknod "$BASE/dev/gpu$i" c 1 3 2>/dev/null || : >"$BASE/dev/gpu$i"
      done
      echo "NodeName=$HOST Name=gpu File=$BASE/dev/gpu[0-$((gpus - 1))]" >"$BASE/etc/gres.conf"
    fi
  else
    : >"$BASE/etc/gres.conf"
  fi
  cat >"$CONF.new" <<EOF
$MARK
ClusterName=archscale
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
# a requeued job is held for cred_expire+1 s before it may start again (default 120)
AuthInfo=cred_expire=10
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$BASE/state/d
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
# no cgroups in a container: track processes through /proc, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# the node may declare more CPUs than the hardware has, so several small jobs run at once
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
# finished jobs stay visible to scontrol show job for 10 minutes
MinJobAge=600
KillWait=10
MailProg=/bin/true
ReturnToService=2
# no slurmdbd: sacct -c reads states and exit codes from the job completion file
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.txt
$gres_types
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem $gres_node State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=long Nodes=$HOST Default=NO MaxTime=INFINITE State=UP
EOF
  mv "$CONF.new" "$CONF"
  # Clients read /etc/slurm/slurm.conf unless SLURM_CONF is set: point it here, but never replace
  # a configuration this script did not write.
  mkdir -p /etc/slurm 2>/dev/null || true
  local etc=/etc/slurm/slurm.conf
  if [ ! -e "$etc" ] || [ -L "$etc" ] || head -n1 "$etc" 2>/dev/null | grep -qF "$MARK"; then
    ln -sfn "$CONF" "$etc" 2>/dev/null || log "could not link $etc; clients need SLURM_CONF=$CONF"
  elif ! cmp -s "$etc" "$CONF"; then
    log "leaving $etc alone (not ours); clients need SLURM_CONF=$CONF"
  fi
}

munge_ok() { munge -n </dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if munge_ok; then return; fi
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  runuser -u munge -- /usr/sbin/munged
  wait_for 10 munged munge_ok || die "munged did not start (see /var/log/munge/munged.log)"
}

node_ready() {
  local state
  state=$(sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n1)
  case $state in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac
}

start() {
  install_packages
  if running slurmctld && running slurmd && munge_ok && node_ready; then
    log "already running (SLURM_CONF=$CONF)"
    return
  fi
  [ "$(id -u)" = 0 ] || die "starting the daemons needs root"
  write_config
  start_munge
  if ! running slurmctld; then
    # -i: ignore state files we cannot recover; a stale state from another host is not an error
    slurmctld -f "$CONF" -i
    wait_for 20 slurmctld scontrol ping || die "slurmctld did not start (see $BASE/log/slurmctld.log)"
  fi
  if ! running slurmd; then
    slurmd -f "$CONF"
  fi
  if ! wait_for 30 "node $HOST" node_ready; then
    # a node that was down (e.g. after an unclean stop) comes back with an explicit resume
    scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
    wait_for 15 "node $HOST" node_ready || die "node $HOST is not ready: $(sinfo -h -N -o '%T %E' 2>&1) (see $BASE/log/)"
  fi
  log "up: node $HOST, partitions $(sinfo -h -o %R | paste -sd, -) (SLURM_CONF=$CONF)"
}

stop_daemon() {  # stop_daemon NAME: TERM, then KILL after 10 s
  local f=$BASE/run/$1.pid pid
  running "$1" || { rm -f "$f"; return 0; }
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 10))
  while kill -0 "$pid" 2>/dev/null; do
    if [ $SECONDS -ge $deadline ]; then kill -9 "$pid" 2>/dev/null || true; break; fi
    sleep 0.2
  done
  rm -f "$f"
}

stop() {
  stop_daemon slurmd
  stop_daemon slurmctld
  # munged is shared with anything else on the machine that uses munge; it is cheap to leave up.
  log "stopped"
}

status() {
  local ok=0
  for d in slurmctld slurmd; do
    if running "$d"; then echo "$d: running (pid $(cat "$BASE/run/$d.pid"))"
    else echo "$d: stopped"; ok=1; fi
  done
  if munge_ok; then echo "munged: running"; else echo "munged: stopped"; ok=1; fi
  if [ $ok = 0 ]; then
    sinfo -N -o '%N %P %T %c %G' || ok=1
  fi
  echo "SLURM_CONF=$CONF"
  return $ok
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
