#!/usr/bin/env bash
# A real Slurm cluster on this machine, for development and tests: one node (this host), or N
# nodes, each slurmd in its own network namespace with its own hostname and address.
#
#   bash slurm/local_cluster.sh install|start [--nodes N]|stop|status|env
#
# install installs the Debian packages if missing (root): Slurm and munge, and with --nodes N > 1
#         iproute2 and util-linux for the nodes' namespaces; starts nothing (the tests' session fixture).
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
#   ARCHSCALE_SLURM_PORT  slurmctld's port (default 6817; another one lets a second cluster run
#                         beside the first, with its own ARCHSCALE_SLURM_DIR)
#   ARCHSCALE_SLURM_NODES nodes, as --nodes (default 1)
#   ARCHSCALE_SLURM_NET   with N > 1: the first three octets of the bridge's /24 (default 10.77.0)
#   ARCHSCALE_SLURM_NODE_PREFIX  with N > 1: node names PREFIX1..PREFIXN (default asnode)
#
# N > 1 (root): a bridge PREFIXbr with address NET.1 (slurmctld and the clients stay in this
# namespace), and per node a network namespace PREFIXi, a veth pair PREFIXvi (on the bridge) /
# eth0 (inside) with address NET.(10+i), an own hostname (unshare --uts) and an /etc/hosts line,
# so a job's MASTER_ADDR (its first node's name) and every task's own hostname resolve to
# addresses inside those namespaces: all traffic stays on the bridge. `stop` removes the
# daemons, the namespaces, the links and the /etc/hosts block it wrote, and nothing else.
#
# No slurmdbd: accounting_storage/none + jobcomp/filetxt, so `sacct -c` reads finished jobs'
# states and exit codes from a text file. Facts behind the settings: ../shared/notes/slurm.md.
set -euo pipefail

BASE=${ARCHSCALE_SLURM_DIR:-/tmp/archscale-slurm}
CPUS=${ARCHSCALE_SLURM_CPUS:-8}
CONF=$BASE/etc/slurm.conf
HOST=$(hostname -s)
PORT=${ARCHSCALE_SLURM_PORT:-6817}
NET=${ARCHSCALE_SLURM_NET:-10.77.0}
PREFIX=${ARCHSCALE_SLURM_NODE_PREFIX:-asnode}
HOSTS_MARK="# archscale local_cluster $BASE"
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
  # Slurm and munge; with --nodes > 1 also iproute2 (ip) and util-linux (unshare, nsenter) for the
  # nodes' network namespaces: a fresh machine has none of them.
  local pkgs=""
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null || pkgs="slurmctld slurmd slurm-client munge"
  if [ "$NODES" -gt 1 ]; then
    command -v ip >/dev/null || pkgs="$pkgs iproute2"
    command -v unshare >/dev/null && command -v nsenter >/dev/null || pkgs="$pkgs util-linux"
  fi
  [ -n "$pkgs" ] || return 0
  [ "$(id -u)" = 0 ] || die "missing packages ($pkgs) and installing them needs root"
  command -v apt-get >/dev/null || die "missing packages ($pkgs) and there is no apt-get to install them"
  log "installing ${pkgs# }"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086  # one word a package
  apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
}

gpu_count() {
  if [ -n "${ARCHSCALE_SLURM_GPUS:-}" ]; then echo "$ARCHSCALE_SLURM_GPUS"; return; fi
  local n; n=$(ls /dev 2>/dev/null | grep -c '^nvidia[0-9][0-9]*$' || true)
  if [ "$n" -gt 0 ]; then echo "$n"; else echo 2; fi
}

node_names() {  # the node names, one a line
  if [ "$NODES" = 1 ]; then echo "$HOST"; else for ((i = 1; i <= NODES; i++)); do echo "$PREFIX$i"; done; fi
}

node_expr() { if [ "$NODES" = 1 ]; then echo "$HOST"; else echo "$PREFIX[1-$NODES]"; fi; }

write_config() {
  mkdir -p "$BASE"/{etc,run,log,state/ctld,state/d}
  echo "$NODES" >"$BASE/etc/nodes"
  local gpus mem gres_node="" gres_types="" nodes ctld_addr node_lines="" d_suffix=""
  nodes=$(node_expr)
  gpus=$(gpu_count)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)  # MiB, some left for the OS
  if [ "$gpus" -gt 0 ]; then
    gres_types="GresTypes=gpu"
    gres_node="Gres=gpu:$gpus"
    if [ -e /dev/nvidia0 ] && [ -z "${ARCHSCALE_SLURM_GPUS:-}" ]; then
      echo "NodeName=$nodes Name=gpu File=/dev/nvidia[0-$((gpus - 1))]" >"$BASE/etc/gres.conf"
    else  # stand-in device files: enough to rehearse one task per GPU on a CPU machine
      mkdir -p "$BASE/dev"
      for ((i = 0; i < gpus; i++)); do  # a character device (like /dev/null) keeps slurmd quiet
        [ -e "$BASE/dev/gpu$i" ] || mknod "$BASE/dev/gpu$i" c 1 3 2>/dev/null || : >"$BASE/dev/gpu$i"
      done
      echo "NodeName=$nodes Name=gpu File=$BASE/dev/gpu[0-$((gpus - 1))]" >"$BASE/etc/gres.conf"
    fi
  else
    : >"$BASE/etc/gres.conf"
  fi
  if [ "$NODES" = 1 ]; then
    ctld_addr=127.0.0.1
    node_lines="NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem $gres_node State=UNKNOWN"
  else  # one slurmd per network namespace: per-node pid, log and spool files (%n: the node name)
    ctld_addr=$NET.1 d_suffix=-%n
    for ((i = 1; i <= NODES; i++)); do
      node_lines+="NodeName=$PREFIX$i NodeAddr=$NET.$((10 + i)) CPUs=$CPUS RealMemory=$((mem / NODES)) $gres_node State=UNKNOWN"$'\n'
    done
  fi
  cat >"$CONF.new" <<EOF
$MARK
ClusterName=archscale
SlurmctldHost=$HOST($ctld_addr)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
# a requeued job is held for cred_expire+1 s before it may start again (default 120)
AuthInfo=cred_expire=10
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$BASE/state/d$d_suffix
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd$d_suffix.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd$d_suffix.log
SlurmctldPort=$PORT
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
$node_lines
PartitionName=debug Nodes=$nodes Default=YES MaxTime=INFINITE State=UP
PartitionName=long Nodes=$nodes Default=NO MaxTime=INFINITE State=UP
EOF
  mv "$CONF.new" "$CONF"
  # Clients read /etc/slurm/slurm.conf unless SLURM_CONF is set: point it here, but never replace
  # a configuration this script did not write.
  local etc=/etc/slurm/slurm.conf
  if [ "$NODES" != 1 ] || [ "$PORT" != 6817 ]; then  # a second cluster beside the one-node one
    log "clients need SLURM_CONF=$CONF (eval \"\$(bash $0 env)\"); $etc is left alone"
    return
  fi
  mkdir -p /etc/slurm 2>/dev/null || true
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

node_ready() {  # every node of the cluster is up
  local n=0 state
  while read -r state; do
    case $state in idle|mixed|allocated|completing) n=$((n + 1)) ;; *) return 1 ;; esac
  done < <(sinfo -h -N -n "$(node_expr)" -o '%N %T' 2>/dev/null | awk '!seen[$1]++ {print $2}')
  [ "$n" = "$NODES" ]
}

slurmd_name() { if [ "$NODES" = 1 ]; then echo slurmd; else echo "slurmd-$1"; fi; }

slurmds_running() {
  local name
  for name in $(node_names); do running "$(slurmd_name "$name")" || return 1; done
}

# ---- N > 1: network namespaces on a bridge (only names and addresses this script chose) ----
hosts_block() {  # hosts_block write|remove: our lines in /etc/hosts, between two marker lines
  local tmp; tmp=$(mktemp)
  if [ -e /etc/hosts ]; then
    awk -v b="$HOSTS_MARK begin" -v e="$HOSTS_MARK end" '$0 == b {skip = 1} !skip {print} $0 == e {skip = 0}' \
      /etc/hosts >"$tmp"
  fi
  if [ "$1" = write ]; then
    { echo "$HOSTS_MARK begin"
      for ((i = 1; i <= NODES; i++)); do echo "$NET.$((10 + i)) $PREFIX$i"; done
      echo "$HOSTS_MARK end"; } >>"$tmp"
  fi
  cat "$tmp" >/etc/hosts  # in place: /etc/hosts may be a mount point
  rm -f "$tmp"
}

has_netns() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$1"; }

net_up() {
  [ "$(id -u)" = 0 ] || die "--nodes $NODES needs root (network namespaces and veth pairs)"
  command -v ip >/dev/null && command -v unshare >/dev/null || die "--nodes $NODES needs ip (iproute2) and unshare"
  local br=${PREFIX}br i ns
  if ! ip link show "$br" >/dev/null 2>&1; then
    ip link add "$br" type bridge 2>/dev/null || die "cannot create the bridge $br: network namespaces are not available here"
    ip addr add "$NET.1/24" dev "$br"
  fi
  ip link set "$br" up
  for ((i = 1; i <= NODES; i++)); do
    ns=$PREFIX$i
    has_netns "$ns" || ip netns add "$ns" 2>/dev/null || die "cannot create the network namespace $ns"
    if ! ip link show "${PREFIX}v$i" >/dev/null 2>&1; then
      ip link add "${PREFIX}v$i" type veth peer name "${PREFIX}p$i" || die "cannot create the veth pair ${PREFIX}v$i"
      ip link set "${PREFIX}p$i" netns "$ns"
      ip netns exec "$ns" ip link set "${PREFIX}p$i" name eth0
      ip netns exec "$ns" ip addr add "$NET.$((10 + i))/24" dev eth0
    fi
    ip link set "${PREFIX}v$i" master "$br" up
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" ip link set eth0 up
  done
  hosts_block write
}

net_down() {
  local i ns pid
  for ((i = 1; i <= NODES; i++)); do
    ns=$PREFIX$i
    if has_netns "$ns"; then  # what still runs in it (job steps slurmd started) goes with it
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
      ip netns del "$ns" 2>/dev/null || true
    fi
    ip link del "${PREFIX}v$i" 2>/dev/null || true
  done
  ip link del "${PREFIX}br" 2>/dev/null || true
  hosts_block remove
}

start_slurmd() {  # start_slurmd NODE
  if [ "$NODES" = 1 ]; then slurmd -f "$CONF"; return; fi
  # its own network namespace and hostname: the node's tasks resolve and bind their own address
  # (nsenter, not `ip netns exec`, which remounts /sys without /sys/fs/cgroup and slurmd fails)
  nsenter --net="/run/netns/$1" unshare --uts -- sh -c 'hostname "$1" && exec slurmd -N "$1" -f "$2"' slurmd "$1" "$CONF" \
    || die "slurmd of $1 did not start (see $BASE/log/slurmd-$1.log)"
}

start() {
  install_packages
  local before
  before=$(cat "$BASE/etc/nodes" 2>/dev/null || echo "$NODES")
  if [ "$before" != "$NODES" ] && running slurmctld; then
    die "a cluster of $before node(s) runs in $BASE: stop it first (bash $0 stop), or use another ARCHSCALE_SLURM_DIR"
  fi
  if running slurmctld && slurmds_running && munge_ok && node_ready; then
    log "already running: $NODES node(s) (SLURM_CONF=$CONF)"
    return
  fi
  [ "$(id -u)" = 0 ] || die "starting the daemons needs root"
  [ "$NODES" = 1 ] || net_up
  write_config
  start_munge
  if ! running slurmctld; then
    # -i: ignore state files we cannot recover; a stale state from another host is not an error
    slurmctld -f "$CONF" -i
    wait_for 20 slurmctld scontrol ping || die "slurmctld did not start (see $BASE/log/slurmctld.log)"
  fi
  local name
  for name in $(node_names); do
    running "$(slurmd_name "$name")" || start_slurmd "$name"
  done
  if ! wait_for 30 "nodes $(node_expr)" node_ready; then
    # a node that was down (e.g. after an unclean stop) comes back with an explicit resume
    scontrol update NodeName="$(node_expr)" State=RESUME >/dev/null 2>&1 || true
    wait_for 15 "nodes $(node_expr)" node_ready || die "nodes $(node_expr) are not ready: $(sinfo -h -N -o '%N %T %E' 2>&1 | paste -sd';' -) (see $BASE/log/)"
  fi
  log "up: node(s) $(node_expr), partitions $(sinfo -h -o %R | paste -sd, -) (SLURM_CONF=$CONF)"
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
  local name
  for name in $(node_names); do stop_daemon "$(slurmd_name "$name")"; done
  stop_daemon slurmctld
  [ "$NODES" = 1 ] || net_down
  # munged is shared with anything else on the machine that uses munge; it is cheap to leave up.
  log "stopped"
}

status() {
  local ok=0
  for d in slurmctld $(for n in $(node_names); do slurmd_name "$n"; done); do
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

cmd=${1:-}
[ $# -gt 0 ] && shift
NODES=${ARCHSCALE_SLURM_NODES:-}
while [ $# -gt 0 ]; do
  case $1 in
    --nodes) NODES=${2:-}; shift 2 || die "--nodes needs a number" ;;
    --nodes=*) NODES=${1#--nodes=}; shift ;;
    *) die "unknown argument $1 (usage: $0 install|start [--nodes N]|stop|status|env)" ;;
  esac
done
if [ -z "$NODES" ]; then  # stop, status and a plain start: the cluster's own count
  NODES=$(cat "$BASE/etc/nodes" 2>/dev/null || echo 1)
  [ "$cmd" = start ] && ! running slurmctld && NODES=1
  [ "$cmd" = install ] && NODES=1
fi
case $NODES in ''|*[!0-9]*|0) die "--nodes $NODES: give a number >= 1" ;; esac
[ "$NODES" -le 200 ] || die "--nodes $NODES: at most 200 (one /24 for the bridge)"

case $cmd in
  install) install_packages ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 install|start [--nodes N]|stop|status|env" >&2; exit 2 ;;
esac
