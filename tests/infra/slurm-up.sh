#!/usr/bin/env bash
# Bring up a private single-machine Slurm cluster for the test suite (run as root).
#
#   bash tests/infra/slurm-up.sh STATE_DIR      then   STATE_DIR/bin/sinfo, STATE_DIR/bin/sbatch, ...
#   bash tests/infra/slurm-down.sh STATE_DIR    stops every process it started, by PID
#
# Everything that listens (slurmctld on 6817, one slurmd per emulated node on 17001+) lives in
# a network namespace of its own that has only loopback, so nothing is reachable from outside.
# munged talks over a unix socket in STATE_DIR; the config is STATE_DIR/slurm.conf (SLURM_CONF),
# so /etc is left alone. STATE_DIR/bin holds the client commands (sbatch, squeue, ...) as
# wrappers that enter the namespace and point at that config: put it first on PATH.
#
# Environment: SLURM_NS (namespace name, default gptrain-slurm), NODES (default "n1 n2"),
# CPUS_PER_NODE (default 2; more than the machine has is fine: Slurm only counts them).
set -euo pipefail
ST=${1:?usage: slurm-up.sh STATE_DIR}
NS=${SLURM_NS:-gptrain-slurm}
NODES=${NODES:-n1 n2}
CPUS_PER_NODE=${CPUS_PER_NODE:-2}
case $ST in /*) ;; *) echo "slurm-up.sh: STATE_DIR must be absolute: $ST" >&2; exit 2 ;; esac
for cmd in slurmctld slurmd munged ip nsenter unshare; do
  command -v "$cmd" >/dev/null || { echo "slurm-up.sh: $cmd not found: run scripts/system-deps.sh" >&2; exit 2; }
done

IN=(nsenter "--net=/run/netns/$NS")
mkdir -p "$ST"/{log,pid,spool,bin,munge}
echo "$NS" >"$ST/netns"

# 1. The namespace. 127.0.0.2 matters: with 127.0.0.1 as its only IPv4 address, glibc's
#    getaddrinfo(AI_ADDRCONFIG) finds no address and slurmctld loops on "Name or service not known".
[ -e "/run/netns/$NS" ] || ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" addr add 127.0.0.2/8 dev lo 2>/dev/null || true

# Start a daemon in the namespace, in a session of its own, and record its PID.
start() {  # NAME COMMAND...
  "${IN[@]}" setsid "${@:2}" >"$ST/log/$1.out" 2>&1 </dev/null &
  # nsenter execs setsid, which execs the daemon (it is not a group leader, so it does not fork).
  echo $! >"$ST/pid/$1.pid"
}

# 2. munged with its own key and socket. --force: munged wants every directory above its socket
#    to be world-searchable, and pytest's temporary directories are not (root runs it all anyway).
(umask 077; [ -s "$ST/munge/munge.key" ] || head -c 1024 /dev/urandom >"$ST/munge/munge.key")
SOCKET=$ST/munge/munge.socket
start munged munged --foreground --force --socket="$SOCKET" --key-file="$ST/munge/munge.key" \
  --pid-file="$ST/munge/munged.pid" --log-file="$ST/log/munged.log" --seed-file="$ST/munge/munged.seed"
for _ in $(seq 50); do [ -S "$SOCKET" ] && break; sleep 0.1; done

# 3. slurm.conf: every emulated node is this machine, on 127.0.0.1 with a port of its own.
port=17001 nodelines=""
for node in $NODES; do
  nodelines+="NodeName=$node NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=$port CPUs=$CPUS_PER_NODE RealMemory=8000 State=UNKNOWN"$'\n'
  port=$((port + 1))
done
cat >"$ST/slurm.conf" <<EOF
ClusterName=gptrain-test
SlurmctldHost=$(hostname)(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again only cred_expire seconds after it ended (default 120).
AuthInfo=socket=$SOCKET,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Schedule every second, not every 30-60 s: requeued and dependent jobs start promptly.
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
StateSaveLocation=$ST/spool/ctld
SlurmdSpoolDir=$ST/spool/%n
SlurmctldPidFile=$ST/pid/slurmctld.pidfile
SlurmdPidFile=$ST/pid/slurmd-%n.pidfile
SlurmctldLogFile=$ST/log/slurmctld.log
SlurmdLogFile=$ST/log/slurmd-%n.log
${nodelines}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$ST/slurm.conf

# 4. Client wrappers: enter the namespace, use this cluster's config.
for cmd in sbatch srun salloc scancel squeue sinfo scontrol sacct; do
  printf '#!/bin/sh\nSLURM_CONF=%q exec nsenter --net=/run/netns/%q %q "$@"\n' \
    "$SLURM_CONF" "$NS" "$(command -v "$cmd")" >"$ST/bin/$cmd"
  chmod +x "$ST/bin/$cmd"
done

# 5. Daemons. nsenter rather than `ip netns exec`, which remounts /sys, and slurmd then fails
#    with "No filesystem mounted on /sys/fs/cgroup". Each slurmd gets a private mount namespace
#    whose /etc/hosts maps the node names to 127.0.0.1: jobs inherit it, so that
#    torch.distributed reaches "n1" (the host's /etc/hosts is not touched).
(cat /etc/hosts; echo "127.0.0.1 $NODES") >"$ST/hosts"
start slurmctld slurmctld -D
for node in $NODES; do
  mkdir -p "$ST/spool/$node"
  start "slurmd-$node" unshare --mount --propagation private \
    bash -c "mount --bind '$ST/hosts' /etc/hosts && exec slurmd -D -N '$node'"
done
for _ in $(seq 150); do
  [ "$("$ST/bin/sinfo" -h -o %T 2>/dev/null | sort -u)" = idle ] && exit 0
  sleep 0.2
done
echo "slurm-up.sh: nodes not idle after 30 s:" >&2
"$ST/bin/sinfo" -N >&2 || true
tail -n 20 "$ST"/log/*.log "$ST"/log/*.out >&2 || true
exit 1
