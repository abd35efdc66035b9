"""What the jobs run, in the job's own process: gptrain's commands and its trainer.

submitit pickles these callables on the submitting machine and calls them on the nodes, where
they are imported from the same installation (`jobs` is installed with gptrain). A preempted
training (gptrain.errors.EXIT_PREEMPTED) is requeued through submitit's checkpoint protocol.
"""

from __future__ import annotations

import logging
import shlex
import signal
import time
from dataclasses import dataclass
from typing import Any, NoReturn

import submitit

from gptrain.errors import EXIT_OK, EXIT_PREEMPTED

# How long the ranks other than 0 wait for rank 0's requeue, which ends the whole job, before
# giving up: rank 0 pickles this callable and runs `scontrol requeue` (at most 60 s).
REQUEUE_WAIT_S = 300


def run_gptrain(*argv: str) -> int:
    """`gptrain ARGV...` in this process: EXIT_OK, or EXIT_PREEMPTED when a training stopped at a
    checkpoint after a preemption signal; an exception if it failed (its message is in stderr)."""
    from gptrain.cli import main

    status = main(list(argv))
    if status not in (EXIT_OK, EXIT_PREEMPTED):
        raise RuntimeError(f"`gptrain {shlex.join(argv)}` exited with status {status}; the job's stderr says why")
    return status


@dataclass(frozen=True)
class PreprocessTask:
    """Task `index` of `num_tasks`: download, then tokenize, the books whose id mod num_tasks is
    `index`. The tasks never coordinate; `finalize` merges their output once all succeeded."""

    mirror: str
    raw: str
    dataset: str
    num_tasks: int
    workers: int = 1  # tokenizer processes: the task's CPUs
    download_args: tuple[str, ...] = ()
    prepare_args: tuple[str, ...] = ()

    def __call__(self, index: int) -> None:
        # Nothing to checkpoint here: SIGTERM ends the task, as it ends `gptrain data` (a rerun
        # skips finished work). submitit's handler ignores SIGTERM, and the tokenizer processes
        # that prepare forks would inherit it and outlive the SIGTERM that stops their pool.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        task = ("--task-index", str(index), "--num-tasks", str(self.num_tasks))
        run_gptrain("data", "download", "--mirror", self.mirror, "--out", self.raw, *task, *self.download_args)
        # The finalize job writes the manifest, once, after every task has succeeded.
        run_gptrain(
            "data", "prepare", "--input", self.raw, "--out", self.dataset, *task,
            "--workers", str(self.workers), "--no-finalize", *self.prepare_args,
        )


def finalize(dataset: str) -> str:
    """Merge the tasks' manifests into the dataset's; its fingerprint."""
    from gptrain.data.manifest import load_manifest

    run_gptrain("data", "finalize", dataset)
    return load_manifest(dataset)["fingerprint"]


class Pretrain(submitit.helpers.Checkpointable):
    """`gptrain train --config CONFIG OVERRIDES...`, one rank per submitit task; returns the
    trainer's summary.

    Warned before the time limit or preempted (submitit's USR2, or SIGTERM), every rank saves
    its part of a checkpoint and stops; then rank 0 has submitit requeue the job, while the
    other ranks wait for that requeue to end them. The rerun calls this same object again
    (Checkpointable's checkpoint() resubmits it unchanged), and the trainer resumes from the
    newest checkpoint in the run directory: the state lives in storage, not in here.
    """

    def __init__(self, config: str, overrides: tuple[str, ...] = ()):
        self.config = config
        self.overrides = tuple(overrides)

    def __call__(self) -> dict[str, Any]:
        from gptrain.config import load_config
        from gptrain.train.trainer import train

        # The trainer's progress lines, as `gptrain train` prints them (to the job's stderr).
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # RANK, WORLD_SIZE, MASTER_ADDR, ... from the submitit job (Slurm or local), which
        # gptrain reads as it would torchrun's. Each rank picks its GPU by local rank.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        summary = train(load_config(self.config, self.overrides))
        if summary.get("preempted"):
            _requeue_with_submitit()
        return summary


@dataclass(frozen=True)
class SweepTrial(submitit.helpers.Checkpointable):
    """Trial `index` of a sweep (`gptrain sweep run SPEC --index INDEX OVERRIDES...`); requeued
    and resumed like `Pretrain` when preempted."""

    spec: str
    overrides: tuple[str, ...] = ()
    sweep_dir: str | None = None  # None: the spec's own

    def __call__(self, index: int) -> None:
        where = ("--sweep-dir", self.sweep_dir) if self.sweep_dir else ()
        if run_gptrain("sweep", "run", self.spec, "--index", str(index), *where, *self.overrides) == EXIT_PREEMPTED:
            _requeue_with_submitit()


def _requeue_with_submitit() -> NoReturn:
    """After a preemption save: have submitit requeue the job (it calls checkpoint() first)."""
    # While training, the trainer's signal handlers stood in for submitit's; they are back now.
    # submitit's handler for its preemption signal does the rest: on rank 0 it calls
    # checkpoint(), requeues the job and exits. It is called here rather than signalled, and
    # a late copy of the signal (submitit's interrupt sends SIGTERM, then it) is ignored from
    # now on, so that the requeue cannot start twice.
    usr_sig = signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]
    handler = signal.getsignal(usr_sig)
    if not callable(handler):
        raise RuntimeError("training stopped at a checkpoint after a signal outside a submitit job: rerun to resume")
    signal.signal(usr_sig, signal.SIG_IGN)
    handler(usr_sig, None)
    # Only the other ranks get here. They wait for rank 0's requeue, which ends every task of
    # the job (SIGTERM, let through now): a rank that left first with a non-zero status would
    # have srun (--kill-on-bad-exit) stop rank 0 before it requeued. Should the requeue never
    # come, they leave "preempted" after a while.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(REQUEUE_WAIT_S)
    raise SystemExit(EXIT_PREEMPTED)
