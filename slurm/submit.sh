#!/usr/bin/env bash
# Submit the pipeline as Slurm jobs chained by dependencies; prints "STAGE JOBID" per job.
#
#   slurm/submit.sh [STAGE...] [-- OVERRIDE...]
#
#   preprocess  the download/prepare job array (GPTRAIN_ARRAY_TASKS tasks, default 4), then
#               the finalize job, which starts once every task succeeded (afterok)
#   pretrain    pretrain.sbatch, after finalize (when submitted together)
#   sweep       sweep.sbatch: the trials of GPTRAIN_SWEEP_SPEC (GPTRAIN_SWEEP_TRIALS of them;
#               default: `gptrain sweep plan SPEC --count`, which needs gptrain here), at most
#               GPTRAIN_SWEEP_PARALLEL at once (default 2), after finalize
#
# Default stages: preprocess pretrain. OVERRIDEs are config overrides for pretrain and sweep.
# Every GPTRAIN_* variable the sbatch scripts read (GPTRAIN_MIRROR, GPTRAIN_DATASET,
# GPTRAIN_CONFIG, GPTRAIN_VENV, ...) is passed on to the jobs.
# More sbatch options: GPTRAIN_SBATCH_ARGS for every job, and GPTRAIN_PREPROCESS_SBATCH_ARGS,
# GPTRAIN_PRETRAIN_SBATCH_ARGS, GPTRAIN_SWEEP_SBATCH_ARGS for one stage's jobs, e.g.
#   GPTRAIN_SBATCH_ARGS="--account=proj --partition=gpu" \
#   GPTRAIN_PRETRAIN_SBATCH_ARGS="--nodes=4 --gpus-per-node=8" slurm/submit.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export GPTRAIN_SLURM_DIR=$here  # the sbatch scripts source common.sh from here

stages=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do
  case $1 in
    preprocess | pretrain | sweep) stages+=("$1") ;;
    *) echo "submit.sh: unknown stage '$1' (stages: preprocess pretrain sweep)" >&2; exit 2 ;;
  esac
  shift
done
[ $# -gt 0 ] && shift  # the --
[ ${#stages[@]} -gt 0 ] || stages=(preprocess pretrain)

# submit STAGE_ARGS_VARIABLE SBATCH_ARGUMENT...: the new job's id. A job whose dependency can
# never be met (a task it waits for failed) is cancelled rather than left pending forever.
submit() {
  # shellcheck disable=SC2086  # the *_SBATCH_ARGS variables are lists of options
  sbatch --parsable --kill-on-invalid-dep=yes ${GPTRAIN_SBATCH_ARGS:-} ${!1:-} "${@:2}" | cut -d ';' -f 1
}

after_dataset=()
for stage in "${stages[@]}"; do
  case $stage in
    preprocess)
      tasks=${GPTRAIN_ARRAY_TASKS:-4}
      export GPTRAIN_ARRAY_TASKS=$tasks  # the split, which the tasks (and any rerun of some) use
      array=$(submit GPTRAIN_PREPROCESS_SBATCH_ARGS --array="0-$((tasks - 1))" "$here/preprocess.sbatch")
      echo "preprocess $array"
      finalize=$(submit GPTRAIN_PREPROCESS_SBATCH_ARGS --dependency="afterok:$array" "$here/preprocess.sbatch" finalize)
      echo "finalize $finalize"
      after_dataset=(--dependency="afterok:$finalize")
      ;;
    pretrain)
      echo "pretrain $(submit GPTRAIN_PRETRAIN_SBATCH_ARGS "${after_dataset[@]}" "$here/pretrain.sbatch" "$@")"
      ;;
    sweep)
      : "${GPTRAIN_SWEEP_SPEC:?set GPTRAIN_SWEEP_SPEC to a sweep spec}"
      trials=${GPTRAIN_SWEEP_TRIALS:-$("${GPTRAIN_VENV:+$GPTRAIN_VENV/bin/}gptrain" sweep plan "$GPTRAIN_SWEEP_SPEC" --count)}
      echo "sweep $(submit GPTRAIN_SWEEP_SBATCH_ARGS "${after_dataset[@]}" \
        --array="0-$((trials - 1))%${GPTRAIN_SWEEP_PARALLEL:-2}" "$here/sweep.sbatch" "$@")"
      ;;
  esac
done
