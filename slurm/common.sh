# shellcheck shell=bash
# Sourced by the sbatch scripts: where gptrain comes from and how a job step runs it.
# (sbatch copies a script to the node before running it, so the scripts find this file through
# GPTRAIN_SLURM_DIR, which submit.sh sets, or else the slurm/ folder of the submit directory.)
#
# gptrain from a virtualenv (default) or a container image:
#   GPTRAIN_VENV               virtualenv with gptrain installed; default: ./.venv when it exists,
#                              else whatever `gptrain` is on PATH
#   GPTRAIN_CONTAINER_IMAGE    pyxis/enroot: srun --container-image (docker://REGISTRY#IMAGE:TAG,
#                              or a squashfs file made by `enroot import`)
#   GPTRAIN_CONTAINER_MOUNTS   pyxis: srun --container-mounts (SRC:DST[,...]); the working
#                              directory is always mounted, at the same path, and used as such
#   GPTRAIN_APPTAINER_IMAGE    Apptainer/Singularity: each step runs `apptainer exec IMAGE ...`
#   GPTRAIN_APPTAINER_ARGS     extra `apptainer exec` options, e.g. "--nv --bind /scratch"
#   GPTRAIN_STEP_WRAPPER       any other runtime: a command each step's command is appended to,
#                              e.g. "ch-run /scratch/gptrain --" (Charliecloud)
# Only the job steps run inside the image, which needs no Slurm client: the batch script
# itself (srun, scancel, scontrol requeue) runs on the node's own system.
# GPTRAIN_MAX_REQUEUES (default 100): how often a preempted job (exit status 75) is requeued.
# Relative paths in GPTRAIN_* are relative to the job's working directory (sbatch's default:
# the directory you submitted from).
set -euo pipefail

if [ -n "${GPTRAIN_CONTAINER_IMAGE:-}" ] && [ -n "${GPTRAIN_APPTAINER_IMAGE:-}" ]; then
  echo "set GPTRAIN_CONTAINER_IMAGE (pyxis) or GPTRAIN_APPTAINER_IMAGE, not both" >&2
  exit 2
fi

# Math libraries default to a thread per core of the node, but a task has SLURM_CPUS_PER_TASK
# CPUs (several jobs may share the node).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# The tokenized dataset (folder or fsspec URL): preprocess writes it, pretrain and sweep read it.
dataset=${GPTRAIN_DATASET:-data/gutenberg}

container_srun_options=()
container_exec=()
if [ -n "${GPTRAIN_CONTAINER_IMAGE:-}" ]; then
  container_srun_options=(--container-image="$GPTRAIN_CONTAINER_IMAGE" --container-workdir="$PWD"
                          --container-mounts="$PWD:$PWD${GPTRAIN_CONTAINER_MOUNTS:+,$GPTRAIN_CONTAINER_MOUNTS}")
elif [ -n "${GPTRAIN_APPTAINER_IMAGE:-}" ]; then
  # shellcheck disable=SC2206  # GPTRAIN_APPTAINER_ARGS is a list of options
  container_exec=(apptainer exec --bind "$PWD" --pwd "$PWD" ${GPTRAIN_APPTAINER_ARGS:-} "$GPTRAIN_APPTAINER_IMAGE")
else
  GPTRAIN_VENV=${GPTRAIN_VENV:-$PWD/.venv}
  # Job steps inherit this PATH: gptrain resolves to the virtualenv's.
  if [ -x "$GPTRAIN_VENV/bin/gptrain" ]; then export PATH="$GPTRAIN_VENV/bin:$PATH"; fi
fi
if [ -n "${GPTRAIN_STEP_WRAPPER:-}" ]; then
  # shellcheck disable=SC2206  # a command and its options
  container_exec+=(${GPTRAIN_STEP_WRAPPER})
fi

# step SRUN_OPTION... -- COMMAND...: run COMMAND as a job step (inside the container, if any),
# each output line labelled with its task's rank (srun --label). If any task fails, srun ends
# the others at once (--kill-on-bad-exit) rather than leave them waiting in a collective.
step() {
  local options=()
  while [ "$1" != -- ]; do options+=("$1"); shift; done
  shift
  srun --label --kill-on-bad-exit=1 "${options[@]}" "${container_srun_options[@]}" "${container_exec[@]}" "$@"
}

# For long steps that save a checkpoint when warned (gptrain train, sweep trials).
#
# `#SBATCH --signal=B:USR1@SECONDS` warns only this batch shell before the time limit; bash
# runs the trap once the foreground command returns, so the step runs in the background and
# `wait` is what the trap interrupts. The trap passes the warning on with `scancel --signal`,
# which (without --batch) signals every process of the job's steps and not this shell.
# `scancel --signal=USR1 JOBID` from outside reaches those processes directly, the same way.
# Sets `status` to the step's exit status.
warned_step() {
  trap 'echo "$(date +%T) time limit warning: passing USR1 to the job steps"; scancel --signal=USR1 "$SLURM_JOB_ID"' USR1
  step "$@" &
  local pid=$!
  status=0
  wait "$pid" || status=$?
  while kill -0 "$pid" 2>/dev/null; do status=0; wait "$pid" || status=$?; done
}
# A training command records TERM, USR1 and USR2 from the moment gptrain starts (and saves a
# checkpoint at its first step boundary); `ignoring_early_signals` execs it with them ignored
# until then, as their default action would kill it while Python starts: a warning would end
# the step, and a rank that srun stops because another failed (--kill-on-bad-exit) would die
# by the signal, whose status (143) would hide the first rank's (2 for a bad config).
# shellcheck disable=SC2034  # used by the scripts that source this file
ignoring_early_signals=(bash -c 'trap "" TERM USR1 USR2; exec "$@"' ignoring-early-signals)

# finish STATUS: end the batch script with gptrain's exit status (gptrain/errors.py). 75 means
# the step stopped at a checkpoint after a signal: requeue the job (it was submitted with
# --requeue) so that it resumes, at most GPTRAIN_MAX_REQUEUES times in all. The requeue is run
# here, on the node's own system, so the image the steps run in needs no Slurm client.
finish() {
  local restarts=${SLURM_RESTART_COUNT:-0} max=${GPTRAIN_MAX_REQUEUES:-100}
  if [ "$1" = 75 ]; then
    if [ "$restarts" -lt "$max" ]; then
      echo "$(date +%T) preempted after a checkpoint (status 75): requeueing, restart $((restarts + 1)) of at most $max"
      scontrol requeue "$SLURM_JOB_ID"
    else
      echo "$(date +%T) preempted after a checkpoint (status 75), not requeued: $restarts restarts," \
        "GPTRAIN_MAX_REQUEUES=$max; resubmit the same job to resume"
    fi
  elif [ "$1" != 0 ]; then
    echo "$(date +%T) the step failed with status $1 (2: bad input, not retried; anything else: a crash)"
  fi
  exit "$1"
}
