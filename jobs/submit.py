"""Submitting the pipeline with submitit: the preprocess array and its finalize job, pretraining,
a sweep. Each function returns the submitted jobs; `after` chains them.

On Slurm, a job submitted `after` others waits in the queue for them to succeed (afterok). The
local and debug clusters have no scheduler to do that, so the waiting happens here, before
submitting (their jobs' results are asked for, which also runs debug jobs).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import submitit

from gptrain.errors import GptrainError
from jobs.resources import Resources, make_executor
from jobs.tasks import PreprocessTask, Pretrain, SweepTrial, finalize

Dependency = submitit.Job | str  # a job, or (on Slurm) a job id


def _dependency_ids(cluster: str, after: Sequence[Dependency]) -> list[str]:
    if cluster == "slurm":
        return [job if isinstance(job, str) else job.job_id for job in after]
    for job in after:
        if isinstance(job, str):
            raise GptrainError(f"--cluster {cluster}: cannot wait for job id {job} (only Slurm jobs can depend on ids)")
        job.result()  # raises if it failed
    return []


def submit_preprocess(
    cluster: str,
    folder: str | Path,
    resources: Resources,
    *,
    mirror: str,
    raw: str,
    dataset: str,
    num_tasks: int,
    download_args: Sequence[str] = (),
    prepare_args: Sequence[str] = (),
    after: Sequence[Dependency] = (),
) -> tuple[list[submitit.Job], submitit.Job]:
    """A job array of `num_tasks` download+prepare tasks (one process each), then the finalize job
    once they all succeeded. Returns (the array's jobs, the finalize job)."""
    if num_tasks < 1:
        raise GptrainError(f"--tasks {num_tasks}: must be >= 1")
    per_task = resources.single_process()
    task = PreprocessTask(
        mirror=mirror, raw=raw, dataset=dataset, num_tasks=num_tasks, workers=per_task.cpus_per_task,
        download_args=tuple(download_args), prepare_args=tuple(prepare_args),
    )
    executor = make_executor(cluster, folder, per_task, "gptrain-preprocess", _dependency_ids(cluster, after))
    array = executor.map_array(task, range(num_tasks))
    finalizer = make_executor(cluster, folder, per_task, "gptrain-finalize", _dependency_ids(cluster, array))
    return array, finalizer.submit(finalize, dataset)


def submit_pretrain(
    cluster: str,
    folder: str | Path,
    resources: Resources,
    *,
    config: str,
    overrides: Sequence[str] = (),
    after: Sequence[Dependency] = (),
) -> submitit.Job:
    """`gptrain train` with resources.nodes x resources.tasks_per_node ranks, requeued and
    resumed when preempted. (A job of several tasks: `job.results()` has one summary per rank.)"""
    executor = make_executor(cluster, folder, resources, "gptrain-pretrain", _dependency_ids(cluster, after))
    return executor.submit(Pretrain(config, tuple(overrides)))


def submit_sweep(
    cluster: str,
    folder: str | Path,
    resources: Resources,
    *,
    spec: str,
    overrides: Sequence[str] = (),
    sweep_dir: str | None = None,
    trials: Sequence[int] | None = None,
    after: Sequence[Dependency] = (),
) -> list[submitit.Job]:
    """The sweep's trials (default: all of them) as a job array of one process each, at most
    `resources.array_parallelism` at once."""
    if trials is None:
        trials = range(sweep_size(spec, overrides, sweep_dir))
    per_trial = resources.single_process()
    executor = make_executor(cluster, folder, per_trial, "gptrain-sweep", _dependency_ids(cluster, after))
    return executor.map_array(SweepTrial(spec, tuple(overrides), sweep_dir), list(trials))


def sweep_size(spec: str, overrides: Sequence[str] = (), sweep_dir: str | None = None) -> int:
    """How many trials the spec has (`gptrain sweep plan SPEC --count`)."""
    from gptrain.sweep.plan import open_spec

    return len(open_spec(spec, list(overrides), sweep_dir, write=False).trials)
