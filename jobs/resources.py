"""What a job asks for, described once, and the submitit executor that asks a cluster for it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import submitit

from gptrain.errors import GptrainError

# slurm: sbatch on the cluster this machine submits to; local: subprocesses of this machine
# (one node); debug: in this process, when the result is asked for (for pdb).
CLUSTERS = ("slurm", "local", "debug")


@dataclass(frozen=True)
class Resources:
    """The compute of one job: the same fields for preprocess, pretrain and sweep jobs."""

    nodes: int = 1
    tasks_per_node: int = 1  # processes per node; for training, one per GPU
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float | None = None  # None: the partition's default
    timeout_min: int = 60
    partition: str | None = None  # None: the cluster's default partition
    # The warning signal (submitit: USR2) comes this long before the time limit; the trainer
    # needs it to finish a step and write a checkpoint.
    signal_delay_s: int = 120
    # Time-limit requeues submitit allows a job (preemptions are not counted): a multi-day
    # pretraining under a 24-hour limit needs one a day. submitit's own default is 3.
    max_num_timeout: int = 100
    array_parallelism: int = 8  # job-array tasks (preprocess tasks, sweep trials) running at once
    slurm_options: tuple[str, ...] = ()  # more sbatch options as KEY=VALUE: account=proj, qos=high

    def __post_init__(self) -> None:
        for name in ("nodes", "tasks_per_node", "cpus_per_task", "timeout_min", "array_parallelism"):
            if getattr(self, name) < 1:
                raise GptrainError(f"resources: {name}={getattr(self, name)} must be >= 1")
        if self.max_num_timeout < 0:
            raise GptrainError(f"resources: max_num_timeout={self.max_num_timeout} must be >= 0")
        if self.gpus_per_node < 0:
            raise GptrainError(f"resources: gpus_per_node={self.gpus_per_node} must be >= 0")
        if self.mem_gb is not None and self.mem_gb <= 0:
            raise GptrainError(f"resources: mem_gb={self.mem_gb} must be > 0")
        if not 0 <= self.signal_delay_s < self.timeout_min * 60:
            raise GptrainError(
                f"resources: signal_delay_s={self.signal_delay_s} must be >= 0 and less than timeout_min "
                f"({self.timeout_min} min)"
            )
        self.additional_parameters()  # checks the KEY=VALUE form

    def single_process(self) -> Resources:
        """The same, for one process on one node (a preprocess task, a sweep trial, finalize)."""
        return dataclasses.replace(self, nodes=1, tasks_per_node=1)

    def additional_parameters(self) -> dict[str, str]:
        options = {}
        for option in self.slurm_options:
            key, sep, value = option.partition("=")
            if not sep or not key:
                raise GptrainError(f"resources: slurm option {option!r} must look like KEY=VALUE (e.g. account=proj)")
            options[key.strip().lstrip("-").replace("-", "_")] = value
        return options


def make_executor(
    cluster: str, folder: str | Path, resources: Resources, name: str, after: Sequence[str] = ()
) -> submitit.AutoExecutor:
    """An executor whose jobs get `resources` and, on Slurm, start once every job in `after`
    (job ids; an array task's id stands for its whole array) has succeeded."""
    if cluster not in CLUSTERS:
        raise GptrainError(f"--cluster {cluster!r}: must be one of {', '.join(CLUSTERS)}")
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=resources.max_num_timeout)
    executor.update_parameters(
        name=name,
        nodes=resources.nodes,
        tasks_per_node=resources.tasks_per_node,
        gpus_per_node=resources.gpus_per_node or None,  # no --gpus-per-node=0 on clusters without GPUs
        cpus_per_task=resources.cpus_per_task,
        mem_gb=resources.mem_gb,  # None leaves it out
        timeout_min=resources.timeout_min,
        slurm_partition=resources.partition,
        slurm_signal_delay_s=resources.signal_delay_s,
        slurm_array_parallelism=resources.array_parallelism,
        slurm_additional_parameters=resources.additional_parameters(),
        # Math libraries default to a thread per core of the node, not per CPU of the task.
        slurm_setup=[f"export OMP_NUM_THREADS={resources.cpus_per_task}"],
        # Fail fast: a task that dies (a rank's crash) ends the others at once, instead of
        # leaving them in a collective until its timeout. A preempted rank never exits first
        # (jobs.tasks waits for rank 0's requeue).
        slurm_srun_args=["--kill-on-bad-exit=1"],
    )
    if after:
        job_ids = sorted({job_id.split("_")[0] for job_id in after})  # 12_3 -> array 12: all its tasks
        executor.update_parameters(
            slurm_dependency="afterok:" + ":".join(job_ids),
            # Cancelled, not left pending forever, if a job it waits for fails.
            slurm_additional_parameters={**resources.additional_parameters(), "kill_on_invalid_dep": "yes"},
        )
    return executor
