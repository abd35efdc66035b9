"""Which task of a job array this process is: the one source of truth for array partitioning.

Order of precedence for the index: the explicit argument, then Slurm's `SLURM_ARRAY_TASK_ID`,
then a Kubernetes Indexed Job's `JOB_COMPLETION_INDEX`, else 0. The index is the array id
itself, so resubmitting a subset of the ids (`sbatch --array=3`, `--array=1,3`) reruns
exactly those tasks of the original split.

The task count is the submission's choice, which a subset of the array cannot tell: the
explicit argument, then `GPTRAIN_NUM_TASKS` (set by slurm/preprocess.sbatch and the
Kubernetes manifests, which do not expose `completions`), then, for a Slurm array whose ids
are exactly 0..N-1, its `SLURM_ARRAY_TASK_COUNT`; a partial Slurm array without a count is
refused rather than re-split. Outside arrays there is one task.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from gptrain.errors import GptrainError


@dataclass(frozen=True)
class ArrayTask:
    index: int
    count: int

    def owns(self, key: int) -> bool:
        """Deterministic partition of integer keys (e.g. book ids) across the tasks."""
        return key % self.count == self.index


def resolve_array_task(
    index: int | None = None, count: int | None = None, environ: Mapping[str, str] = os.environ
) -> ArrayTask:
    slurm = "SLURM_ARRAY_TASK_ID" in environ
    if index is None:
        if slurm:
            index = _int(environ, "SLURM_ARRAY_TASK_ID")
        elif "JOB_COMPLETION_INDEX" in environ:
            index = _int(environ, "JOB_COMPLETION_INDEX")
        else:
            index = 0
    if count is None:
        if "GPTRAIN_NUM_TASKS" in environ:
            count = _int(environ, "GPTRAIN_NUM_TASKS")
        elif slurm:
            count = _whole_slurm_array_count(environ)
        else:
            count = 1
    if count < 1:
        raise GptrainError(f"number of array tasks must be >= 1, got {count}")
    if not 0 <= index < count:
        raise GptrainError(f"array task index {index} is outside 0..{count - 1}")
    if slurm and "SLURM_ARRAY_TASK_MAX" in environ and _int(environ, "SLURM_ARRAY_TASK_MAX") >= count:
        # Every task of such an array fails the same way, before any of them does work.
        raise GptrainError(
            f"this Slurm array's ids go up to {environ['SLURM_ARRAY_TASK_MAX']}, but the split has {count} tasks "
            "(GPTRAIN_NUM_TASKS, --num-tasks): submit ids 0..count-1 or set the count to match"
        )
    return ArrayTask(index=index, count=count)


def _whole_slurm_array_count(environ: Mapping[str, str]) -> int:
    count = _int(environ, "SLURM_ARRAY_TASK_COUNT")
    low = _int(environ, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in environ else 0
    high = _int(environ, "SLURM_ARRAY_TASK_MAX") if "SLURM_ARRAY_TASK_MAX" in environ else count - 1
    if (low, high) != (0, count - 1):
        raise GptrainError(
            f"this Slurm array holds {count} of ids {low}..{high}, a part of a larger split: set GPTRAIN_NUM_TASKS "
            "(or --num-tasks) to the task count of the original array"
        )
    return count


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except (KeyError, ValueError):
        raise GptrainError(f"environment variable {name}={environ.get(name)!r} is not an integer") from None
