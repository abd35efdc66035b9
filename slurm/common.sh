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
# Relative paths in GPTRAIN_* are relative to the job's working directory (sbatch's default:
# the directory you submitted from).
set -euo pipefail

if [ -n "${GPTRAIN_CONTAINER_IMAGE:-}" ] && [ -n "${GPTRAIN_APPTAINER_IMAGE:-}" ]; then
  echo "set GPTRAIN_CONTAINER_IMAGE (pyxis) or GPTRAIN_APPTAINER_IMAGE, not both" >&2
  exit 2
fi

# Math libraries default to a thread per core of the node, but a task has SLURM_CPUS_PER_TASK
# CPUs (several jobs may share the node). torchrun also sets 1 when it starts several workers.
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
  # Job steps inherit this PATH: gptrain and torchrun resolve to the virtualenv's.
  if [ -x "$GPTRAIN_VENV/bin/gptrain" ]; then export PATH="$GPTRAIN_VENV/bin:$PATH"; fi
fi

# step SRUN_OPTION... -- COMMAND...: run COMMAND as a job step (inside the container, if any).
step() {
  local options=()
  while [ "$1" != -- ]; do options+=("$1"); shift; done
  shift
  srun "${options[@]}" "${container_srun_options[@]}" "${container_exec[@]}" "$@"
}

# For long steps that save a checkpoint when warned (gptrain train, sweep trials).
#
# `#SBATCH --signal=B:USR1@SECONDS` warns only this batch shell before the time limit; bash
# runs the trap once the foreground command returns, so the step runs in the background and
# `wait` is what the trap interrupts. The trap passes the warning on with `scancel --signal`,
# which (without --batch) signals every process of the job's steps and not this shell.
# `scancel --signal=USR1 JOBID` from outside reaches those processes directly, the same way.
# In the step, torchrun must ignore USR1/USR2, whose default action would kill it and, with
# it, the step (Slurm ends a step whose task has exited): `ignoring_warnings` execs COMMAND
# with them ignored. The workers inherit that, and gptrain installs its own handlers, which
# save a checkpoint and requeue the job.
warned_step() {
  trap 'echo "$(date +%T) time limit warning: passing USR1 to the job steps"; scancel --signal=USR1 "$SLURM_JOB_ID"' USR1
  step "$@" &
  local pid=$! status=0
  wait "$pid" || status=$?
  while kill -0 "$pid" 2>/dev/null; do status=0; wait "$pid" || status=$?; done
  return "$status"
}
# shellcheck disable=SC2034  # used by the scripts that source this file
ignoring_warnings=(bash -c 'trap "" USR1 USR2; exec "$@"' ignoring-warnings)
