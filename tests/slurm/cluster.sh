#!/usr/bin/env bash
# cluster.sh {up|down [--purge]|status} - a real two-node Slurm cluster on this one machine,
# for the tests in tests/slurm and for CI.
#
# Two `slurmd -N` daemons play nodes "127.0.0.1" and "127.0.0.2" (names that resolve, so code
# that connects to the first host of SLURM_JOB_NODELIST works); slurmctld, slurmdbd and a private
# MariaDB give `sacct` (submitit polls job state with it). No systemd: daemons are started
# directly, every one we start has its PID recorded under $STATE/pids, and `down` signals exactly
# those PIDs (after checking the PID still runs that program). `up` is idempotent.
#
# Environment knobs:
#   GPTV_SLURM_DIR=/tmp/gpt_vision_slurm   state, spool, logs, pid files, MariaDB datadir
#   GPTV_SLURM_CPUS=max(4,nproc)           CPUs declared per node (may exceed the real count)
#   GPTV_SLURM_TIMEOUT=120                 seconds to wait for each daemon and for idle nodes
#   GPTV_SLURM_INSTALL=1                   0: never run apt-get
set -euo pipefail

STATE=${GPTV_SLURM_DIR:-/tmp/gpt_vision_slurm}
NPROC=$(nproc)
CPUS=${GPTV_SLURM_CPUS:-$(( NPROC > 4 ? NPROC : 4 ))}
MEM_MB=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
WAIT_S=${GPTV_SLURM_TIMEOUT:-120}
INSTALL=${GPTV_SLURM_INSTALL:-1}
NODES=(127.0.0.1 127.0.0.2)
CTLD_PORT=6817 DBD_PORT=6819 DB_PORT=3307 NODE_PORT_BASE=17000
DB_PASSWORD=gptvision-local
CONF=/etc/slurm/slurm.conf DBD_CONF=/etc/slurm/slurmdbd.conf
MARK="# gpt_vision tests/slurm/cluster.sh"
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server-core mariadb-client-core)

say() { printf '[cluster.sh %(%T)T] %s\n' -1 "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# running <pidfile> <program>: the recorded PID is alive and still that program (no PID reuse)
running() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(<"$1")
  [[ $pid =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

# await <what> <command...>: poll until the command succeeds; fail early if a daemon we watch died
WATCHED=()
await() {
  local what=$1 deadline=$((SECONDS + WAIT_S)) entry pidfile prog; shift
  until "$@" >/dev/null 2>&1; do
    for entry in "${WATCHED[@]}"; do
      pidfile=${entry%%:*} prog=${entry#*:}
      running "$pidfile" "$prog" || die "$prog died while waiting for $what; tail of its log:
$(tail -n 8 "$STATE/log/$prog"*.log 2>/dev/null)"
    done
    [ $SECONDS -lt $deadline ] || die "no $what after ${WAIT_S}s (logs in $STATE/log)"
    sleep 0.25
  done
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
sql() { mariadb --no-defaults -S "$STATE/mysql/mysqld.sock" -u root "$@"; }
nodes_idle() {
  local states; states=$(sinfo -h -N -o %t 2>/dev/null) || return 1
  [ "$(grep -c . <<<"$states")" = "${#NODES[@]}" ] && ! grep -qv '^idle$' <<<"$states"
}

# A slurmctld that is not ours would read the config we are about to replace.
foreign_slurmctld() {
  local p pid
  for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    [ "$(cat "$p/comm" 2>/dev/null)" = slurmctld ] || continue
    [ "$pid" = "$(cat "$STATE/pids/slurmctld.pid" 2>/dev/null)" ] || { echo "$pid"; return 0; }
  done
  return 1
}

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} = 0 ] && return 0
  [ "$INSTALL" = 1 ] || die "missing Debian packages: ${missing[*]} (GPTV_SLURM_INSTALL=0)"
  say "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y -q --no-install-recommends "${missing[@]}" ||
    { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; }
  } >"$STATE/log/apt.log" 2>&1 || die "apt-get install failed, see $STATE/log/apt.log"
}

slurm_conf() {
  local i
  cat <<EOF
$MARK (state in $STATE)
ClusterName=gptvision
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
# A requeued job may start again only after the credential expiry (default 120 s).
AuthInfo=cred_expire=5
# Bind to the address of the host name (loopback here), not to every interface.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/pids/slurmctld.pid
SlurmdPidFile=$STATE/pids/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
# Batch jobs may be requeued (scontrol requeue, preemption, node failure) unless --no-requeue.
JobRequeue=1
# Seconds between SIGTERM and SIGKILL at time limit / scancel: time to write a checkpoint.
KillWait=10
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
JobCompType=jobcomp/none
# The declared CPUs may exceed the real core count.
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
EOF
  for i in "${!NODES[@]}"; do
    echo "NodeName=${NODES[$i]} NodeHostname=${NODES[$i]} NodeAddr=127.0.0.1 Port=$((NODE_PORT_BASE + i + 1))" \
         "CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM_MB State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
}

slurmdbd_conf() {
  cat <<EOF
$MARK (state in $STATE)
AuthType=auth/munge
DbdHost=$(hostname -s)
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
CommunicationParameters=NoInAddrAny
SlurmUser=root
DebugLevel=info
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/pids/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASSWORD
StorageLoc=slurm_acct_db
EOF
}

all_running() {
  local n
  munge_ok && running "$STATE/pids/mariadbd.pid" mariadbd && running "$STATE/pids/slurmdbd.pid" slurmdbd &&
    running "$STATE/pids/slurmctld.pid" slurmctld || return 1
  for n in "${NODES[@]}"; do running "$STATE/pids/slurmd-$n.pid" slurmd || return 1; done
}

# start_daemon <name> <program> <args...>: a self-daemonizing Slurm/munge daemon writing its own pid file
start_daemon() {
  local name=$1 prog=$2; shift 2
  running "$STATE/pids/$name.pid" "$prog" && return 0
  say "starting $name"
  rm -f "$STATE/pids/$name.pid"
  (cd / && "$@" </dev/null >>"$STATE/log/$name.stderr" 2>&1) || die "$name failed to start: $(tail -n 5 "$STATE/log/$name.stderr")"
  await "$name pid file" test -s "$STATE/pids/$name.pid"
  WATCHED+=("$STATE/pids/$name.pid:$prog")
}

start_munge() {
  munge_ok && return 0
  say "starting munged"
  [ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
  chown -R munge:munge /etc/munge; chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 755 /run/munge
  rm -f /run/munge/munged.pid
  (cd / && runuser -u munge -- /usr/sbin/munged </dev/null >>"$STATE/log/munged.stderr" 2>&1)
  await "munged pid file" test -s /run/munge/munged.pid
  cp /run/munge/munged.pid "$STATE/pids/munged.pid"
  await munged munge_ok
}

start_mariadb() {
  if ! running "$STATE/pids/mariadbd.pid" mariadbd; then
    if [ ! -d "$STATE/mysql/mysql" ]; then
      say "creating MariaDB datadir $STATE/mysql"
      mariadb-install-db --no-defaults --user=root --datadir="$STATE/mysql" --skip-test-db \
        --auth-root-authentication-method=socket >"$STATE/log/mariadb-install.log" 2>&1 ||
        die "mariadb-install-db failed, see $STATE/log/mariadb-install.log"
    fi
    say "starting mariadbd on 127.0.0.1:$DB_PORT"
    # setsid/nohup exec, so $! is mariadbd itself; stdio detached so no caller pipe stays open
    (cd / && exec setsid nohup /usr/sbin/mariadbd --no-defaults --user=root --datadir="$STATE/mysql" \
        --socket="$STATE/mysql/mysqld.sock" --bind-address=127.0.0.1 --port=$DB_PORT \
        --skip-name-resolve --skip-log-bin --innodb-buffer-pool-size=64M \
        --pid-file="$STATE/mysql/mariadbd.pid" --log-error="$STATE/log/mariadbd.log" \
        </dev/null >/dev/null 2>&1) &
    echo $! >"$STATE/pids/mariadbd.pid"
  fi
  await mariadbd sql -e 'SELECT 1'
  running "$STATE/pids/mariadbd.pid" mariadbd || cp "$STATE/mysql/mariadbd.pid" "$STATE/pids/mariadbd.pid"
  sql -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASSWORD';
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
}

up() {
  [ "$(id -u)" = 0 ] || die "must run as root (starts munged, slurmctld, slurmd)"
  mkdir -p "$STATE"/{pids,log,state,spool}
  install_packages
  local new_conf new_dbd changed=0 other n i
  new_conf=$(slurm_conf) new_dbd=$(slurmdbd_conf)
  [ "$(cat "$CONF" 2>/dev/null)" = "$new_conf" ] && [ "$(cat "$DBD_CONF" 2>/dev/null)" = "$new_dbd" ] || changed=1
  if [ $changed = 0 ] && all_running && nodes_idle; then
    say "cluster already up"; sinfo -N; return 0
  fi
  if other=$(foreign_slurmctld); then
    die "a slurmctld not started by this script is running (pid $other); stop it first"
  fi
  if [ $changed = 1 ] && ls "$STATE"/pids/*.pid >/dev/null 2>&1; then
    say "configuration changed: restarting the daemons started earlier"
    down
  fi
  mkdir -p /etc/slurm "$STATE"/{pids,log,state,spool}
  printf '%s\n' "$new_conf" >"$CONF"; chmod 644 "$CONF"
  printf '%s\n' "$new_dbd" >"$DBD_CONF"; chmod 600 "$DBD_CONF"
  for n in "${NODES[@]}"; do mkdir -p "$STATE/spool/$n"; done

  start_munge
  start_mariadb
  start_daemon slurmdbd slurmdbd slurmdbd
  await "slurmdbd on port $DBD_PORT" port_open $DBD_PORT
  start_daemon slurmctld slurmctld slurmctld
  await "slurmctld answering" sh -c 'scontrol ping | grep -q UP'
  for i in "${!NODES[@]}"; do
    start_daemon "slurmd-${NODES[$i]}" slurmd slurmd -N "${NODES[$i]}"
  done
  await "${#NODES[@]} idle nodes" nodes_idle
  say "cluster up: ${#NODES[*]} nodes x $CPUS CPUs; logs in $STATE/log"
  sinfo -N
}

# stop <pidfile> <program>: TERM, then KILL after 10 s; only if the PID still runs that program
stop() {
  local pidfile=$1 prog=$2 pid i
  [ -e "$pidfile" ] || return 0
  if running "$pidfile" "$prog"; then
    pid=$(<"$pidfile")
    say "stopping $prog (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 40); do [ -d "/proc/$pid" ] || break; sleep 0.25; done
    [ -d "/proc/$pid" ] && { say "$prog (pid $pid) ignored SIGTERM: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; }
  fi
  rm -f "$pidfile"
}

down() {
  local jobs f i
  if running "$STATE/pids/slurmctld.pid" slurmctld; then
    jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      say "cancelling jobs $(echo $jobs)"
      timeout 10 scancel $jobs 2>/dev/null || true
      for i in $(seq 60); do [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
    fi
  fi
  for f in "$STATE"/pids/slurmd-*.pid; do stop "$f" slurmd; done
  stop "$STATE/pids/slurmctld.pid" slurmctld
  stop "$STATE/pids/slurmdbd.pid" slurmdbd
  stop "$STATE/pids/mariadbd.pid" mariadbd
  stop "$STATE/pids/munged.pid" munged
}

status() {
  local f prog rc=0
  for f in "$STATE"/pids/*.pid; do
    [ -e "$f" ] || { echo "no daemons recorded in $STATE/pids"; return 1; }
    prog=$(basename "$f" .pid); prog=${prog%%-*}
    if running "$f" "$prog"; then echo "$(basename "$f" .pid): running (pid $(<"$f"))"
    else echo "$(basename "$f" .pid): NOT running"; rc=1; fi
  done
  sinfo -N 2>/dev/null || rc=1
  return $rc
}

case "${1:-}" in
  up) up ;;
  down) down; [ "${2:-}" = --purge ] && { say "removing $STATE"; rm -rf "$STATE"; }; say "down" ;;
  status) status ;;
  *) echo "usage: $0 {up|down [--purge]|status}" >&2; exit 2 ;;
esac
