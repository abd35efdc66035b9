#!/usr/bin/env bash
# Stop the cluster that slurm-up.sh STATE_DIR started: cancel its jobs, stop its daemons by
# their recorded PIDs, then end whatever is still in its network namespace (job processes that
# outlived their slurmd) and delete the namespace. Safe to run twice, or after a failed start.
set -uo pipefail
ST=${1:?usage: slurm-down.sh STATE_DIR}
[ -f "$ST/netns" ] || exit 0
NS=$(cat "$ST/netns")

# A killed process lingers as a zombie until PID 1 reaps it (slowly here): `kill -0` still
# succeeds on one, so state Z counts as dead.
alive() { local s; s=$(ps -o stat= -p "$1" 2>/dev/null); [ -n "$s" ] && [ "${s:0:1}" != Z ]; }
stop_pid() {  # PID: SIGTERM, up to 10 s, then SIGKILL
  alive "$1" || return 0
  kill "$1" 2>/dev/null
  for _ in $(seq 50); do alive "$1" || return 0; sleep 0.2; done
  kill -9 "$1" 2>/dev/null
}

# Jobs first, while slurmctld can still tell the slurmds to end them.
if [ -e "$ST/pid/slurmctld.pid" ] && alive "$(cat "$ST/pid/slurmctld.pid")"; then
  jobs=$("$ST/bin/squeue" -h -o %A 2>/dev/null | sort -u)
  if [ -n "$jobs" ]; then
    # shellcheck disable=SC2086
    "$ST/bin/scancel" $jobs 2>/dev/null
    for _ in $(seq 100); do [ -z "$("$ST/bin/squeue" -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi

for pidfile in "$ST"/pid/slurmd-*.pid "$ST/pid/slurmctld.pid" "$ST/pid/munged.pid"; do
  [ -f "$pidfile" ] || continue
  stop_pid "$(cat "$pidfile")"
  rm -f "$pidfile"
done

# Every process still in the namespace was started by this cluster (a job step, a task).
if [ -e "/run/netns/$NS" ]; then
  left=$(ip netns pids "$NS" 2>/dev/null)
  if [ -n "$left" ]; then
    # shellcheck disable=SC2086
    kill $left 2>/dev/null
    sleep 1
    for pid in $left; do alive "$pid" && kill -9 "$pid" 2>/dev/null; done
  fi
  ip netns del "$NS"
fi
rm -f "$ST/netns"
