#!/usr/bin/env bash
# A real single-node SLURM on this machine (munge + slurmctld + slurmd on localhost), for the grid tests
# and for trying grids before a cluster. Debian/Ubuntu, as root.
#
#   slurm/local-cluster.sh start    # install packages if missing, write the config, start what is not running
#   slurm/local-cluster.sh status   # daemons and sinfo
#   slurm/local-cluster.sh stop     # stop only the daemons this script started (pids in $STATE)
#
# Idempotent: a second start reuses running daemons. An /etc/slurm/slurm.conf not written by this script
# is left alone. State (pids of what it started): $MOWBENCH_SLURM_STATE, default /tmp/mowbench-slurm.
set -euo pipefail

STATE=${MOWBENCH_SLURM_STATE:-/tmp/mowbench-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by mowbench slurm/local-cluster.sh"
HOST=$(hostname -s)

log() { echo "[local-cluster] $*"; }
running() { pgrep -x "$1" >/dev/null 2>&1; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    return
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "error: SLURM is not installed and installing it needs root (apt-get install slurmctld slurmd slurm-client munge)" >&2
    exit 1
  fi
  log "installing slurmctld slurmd slurm-client munge"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

write_config() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    log "keeping the existing $CONF (not written by this script)"
    return
  fi
  local cpus mem
  cpus=$(nproc)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  mkdir -p /etc/slurm
  cat > "$CONF" <<EOF
$MARK
ClusterName=local
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

start_daemon() {  # name, its pid file, command...: start unless running; remember the daemon's pid
  local name=$1 pidfile=$2
  shift 2
  if running "$name"; then
    log "$name already running (reused)"
    return
  fi
  rm -f "$pidfile"
  "$@"
  for _ in $(seq 100); do  # the command forks the daemon and returns; its pid file names the daemon
    if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      cp "$pidfile" "$STATE/$name.pid"
      log "started $name (pid $(cat "$STATE/$name.pid"))"
      return
    fi
    sleep 0.1
  done
  echo "error: $name did not start (see /var/log/slurm/ and /var/log/munge/)" >&2
  exit 1
}

start() {
  install_packages
  mkdir -p "$STATE" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
  chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
  [ -f /etc/munge/munge.key ] || { mungekey --create >/dev/null 2>&1 || \
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; \
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
  write_config
  start_daemon munged /run/munge/munged.pid su -s /bin/sh munge -c /usr/sbin/munged
  start_daemon slurmctld /run/slurmctld.pid slurmctld
  start_daemon slurmd /run/slurmd.pid slurmd
  for _ in $(seq 60); do  # wait until the node takes jobs
    state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null | head -1 || true)
    case "$state" in
      idle*|mix*|alloc*) log "node $HOST is $state"; return ;;
      down*|drain*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  echo "error: node $HOST did not become idle (sinfo: ${state:-none}); see /var/log/slurm/" >&2
  exit 1
}

stop() {
  for name in slurmd slurmctld munged; do
    if [ -f "$STATE/$name.pid" ]; then
      pid=$(cat "$STATE/$name.pid")
      if kill "$pid" 2>/dev/null; then
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        log "stopped $name (pid $pid)"
      fi
      rm -f "$STATE/$name.pid"
    fi
  done
}

status() {
  for name in munged slurmctld slurmd; do
    if running "$name"; then
      owner=$([ -f "$STATE/$name.pid" ] && echo "started by this script" || echo "not started by this script")
      echo "$name: running ($owner)"
    else
      echo "$name: stopped"
    fi
  done
  command -v sinfo >/dev/null && sinfo 2>/dev/null || true
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
