#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the launch tests (tests/launch/test_launch_slurm.py).
#
#   scripts/slurm_local.sh start    install slurm-wlm + munge if missing (apt-get, as root), write a
#                                   minimal slurm.conf, start munged, slurmctld, slurmd in the
#                                   background, wait until the node is idle. Idempotent.
#   scripts/slurm_local.sh stop     cancel our jobs, stop the three daemons by their recorded PIDs.
#   scripts/slurm_local.sh status   daemons + sinfo; exit 0 only if the node answers.
#
# Works as root without systemd (containers, CI). Nothing here touches a real cluster: start
# refuses to overwrite an /etc/slurm/slurm.conf that this script did not write.
# State, logs and PID files live in $MDIFFU_SLURM_STATE (default /var/spool/mdiffu-slurm).
set -uo pipefail

STATE=${MDIFFU_SLURM_STATE:-/var/spool/mdiffu-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by megatron-diffu scripts/slurm_local.sh"
PIDS=$STATE/pids
LOGS=$STATE/log
NODE=$(hostname -s)

say() { echo "[slurm_local] $*"; }
fail() { echo "[slurm_local] ERROR: $*" >&2; exit 1; }

alive() {  # alive NAME -> 0 if the recorded PID of NAME runs
  local f=$PIDS/$1.pid
  [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null
}

node_state() { timeout 10 sinfo -h -N -n "$NODE" -o "%t" 2>/dev/null | head -1; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null \
     && command -v munged >/dev/null; then
    return 0
  fi
  command -v apt-get >/dev/null || fail "slurm/munge not installed and no apt-get here: install slurm-wlm and munge"
  say "installing slurm-wlm and munge with apt-get (once; quiet)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >"$LOGS/apt.log" 2>&1 || fail "apt-get update failed (no network?); see $LOGS/apt.log"
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >>"$LOGS/apt.log" 2>&1 \
    || fail "apt-get install slurm-wlm munge failed; see $LOGS/apt.log"
}

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    fail "$CONF exists and was not written by this script (a real cluster?): refusing to overwrite it"
  fi
  local cpus mem
  cpus=$(nproc)
  # leave the OS 10% (at least 256 MB) so slurmd does not drain the node for low memory
  mem=$(free -m | awk '/^Mem:/ {m=$2 - ($2/10 > 256 ? int($2/10) : 256); print (m > 100 ? m : 100)}')
  mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$STATE/run"
  local tmp=$CONF.tmp.$$
  cat >"$tmp" <<EOF
$MARKER
# A one-node cluster on localhost for tests; see the script for how to start and stop it.
ClusterName=mdiffu-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again cred_expire seconds after the requeue (default 120 s)
AuthInfo=cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# test cluster: look for runnable jobs (e.g. requeued ones) every 2 s, not every 30-60 s
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
SwitchType=switch/none
JobRequeue=1
ReturnToService=2
MinJobAge=600
KillWait=10
InactiveLimit=0
Waittime=0
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  mv -f "$tmp" "$CONF"  # no cgroup.conf: with proctrack/linuxproc + task/none slurmd only probes cgroups
}

start_munge() {
  alive munged && return 0
  if [ ! -s /etc/munge/munge.key ]; then
    say "creating the munge key"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key >/dev/null 2>&1 || true; fi
    [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  if id munge >/dev/null 2>&1; then
    chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
    chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key; chmod 755 /run/munge
    # setpriv execs (no fork), so $! is munged itself
    setsid setpriv --reuid=munge --regid=munge --init-groups munged -F >"$LOGS/munged.out" 2>&1 &
  else
    chmod 400 /etc/munge/munge.key
    setsid munged -F --force >"$LOGS/munged.out" 2>&1 &
  fi
  echo $! >"$PIDS/munged.pid"
  for _ in $(seq 50); do
    [ -S /run/munge/munge.socket.2 ] && return 0
    alive munged || break
    sleep 0.2
  done
  fail "munged did not start; see $LOGS/munged.out and /var/log/munge/munged.log"
}

start_daemon() {  # start_daemon NAME -> runs NAME -D in the background, records its PID
  local name=$1
  alive "$name" && return 0
  setsid "$name" -D >"$LOGS/$name.out" 2>&1 &
  echo $! >"$PIDS/$name.pid"
  sleep 0.5
  alive "$name" || fail "$name exited at once; see $LOGS/$name.out and $LOGS/$name.log"
}

wait_idle() {
  local st=""
  for i in $(seq 60); do
    st=$(node_state)
    case "$st" in
      idle|mix|alloc|comp) return 0 ;;
      down*|drain*|drng*|fail*)
        # a previous run left the node down: bring it back
        [ $((i % 5)) -eq 1 ] && scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 ;;
    esac
    alive slurmctld || fail "slurmctld died; see $LOGS/slurmctld.log"
    alive slurmd || fail "slurmd died; see $LOGS/slurmd.log"
    sleep 1
  done
  fail "node $NODE not idle after 60 s (state '${st:-no answer}'); see $LOGS/slurmctld.log and $LOGS/slurmd.log"
}

cmd_start() {
  [ "$(id -u)" -eq 0 ] || fail "must run as root (starts munged/slurmctld/slurmd and writes $CONF)"
  mkdir -p "$PIDS" "$LOGS"
  if alive munged && alive slurmctld && alive slurmd; then
    case "$(node_state)" in
      idle|mix|alloc|comp) say "already running (node $NODE $(node_state))"; return 0 ;;
    esac
  fi
  install_packages
  write_conf
  start_munge
  start_daemon slurmctld
  start_daemon slurmd
  wait_idle
  say "up: node $NODE ($(nproc) CPUs), partition debug; logs in $LOGS; stop with $0 stop"
}

stop_pid() {  # stop_pid NAME: TERM, wait up to 10 s, then KILL; only the recorded PID
  local f=$PIDS/$1.pid pid
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$f"
}

cmd_stop() {
  if alive slurmctld; then
    # our jobs only exist in our cluster: cancel them so their steps do not outlive slurmd
    timeout 10 scancel --full --quiet --partition=debug >/dev/null 2>&1 || true
    sleep 1
  fi
  stop_pid slurmd
  stop_pid slurmctld
  stop_pid munged
  say "stopped"
}

cmd_status() {
  local ok=0
  for d in munged slurmctld slurmd; do
    if alive "$d"; then say "$d running (pid $(cat "$PIDS/$d.pid"))"; else say "$d not running"; ok=1; fi
  done
  if command -v sinfo >/dev/null; then timeout 10 sinfo 2>&1 || ok=1; fi
  return $ok
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
