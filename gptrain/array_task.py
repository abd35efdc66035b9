"""Which task of a job array this process is: the one source of truth for array partitioning.

Order of precedence: explicit arguments, then Slurm job arrays (`SLURM_ARRAY_TASK_ID`,
relative to `SLURM_ARRAY_TASK_MIN`, and `SLURM_ARRAY_TASK_COUNT`), then Kubernetes Indexed
Jobs (`JOB_COMPLETION_INDEX`, with the task count in `GPTRAIN_NUM_TASKS` because Kubernetes
does not inject `completions`), else a single task.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from gptrain.errors import GptrainError


@dataclass(frozen=True)
class ArrayTask:
    index: int
    count: int

    def owns(self, key: int) -> bool:
        """Deterministic partition of integer keys (e.g. book ids) across the tasks."""
        return key % self.count == self.index


def resolve_array_task(index: int | None = None, count: int | None = None) -> ArrayTask:
    env = os.environ
    if index is None:
        if "SLURM_ARRAY_TASK_ID" in env:
            index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        elif "JOB_COMPLETION_INDEX" in env:
            index = int(env["JOB_COMPLETION_INDEX"])
        else:
            index = 0
    if count is None:
        if "SLURM_ARRAY_TASK_COUNT" in env:
            count = int(env["SLURM_ARRAY_TASK_COUNT"])
        elif "GPTRAIN_NUM_TASKS" in env:
            count = int(env["GPTRAIN_NUM_TASKS"])
        else:
            count = 1
    if count < 1:
        raise GptrainError(f"number of array tasks must be >= 1, got {count}")
    if not 0 <= index < count:
        raise GptrainError(f"array task index {index} is outside 0..{count - 1}")
    return ArrayTask(index=index, count=count)
