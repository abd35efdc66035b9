"""Preemption: catch the scheduler's warning signal, stop at a step boundary, save, exit.

Clusters warn a job before they kill it: Slurm sends SIGTERM on preemption or scancel (and
whatever `--signal=[B:]SIG@SECONDS` names, usually SIGUSR1/SIGUSR2, ahead of the time
limit); Kubernetes sends SIGTERM and waits terminationGracePeriodSeconds; torchrun forwards
the SIGTERM it gets to its workers. The handler only records which signal arrived and when:
a signal can land anywhere (inside a collective, half way through an optimizer step), so no
work may happen there. At the next step boundary every rank calls `agree()`, an all-reduce,
so all ranks stop at the same step even if only some of them were signalled; the trainer
then saves synchronously and exits with PREEMPTED_EXIT_CODE.

Requeue: under Slurm, `scontrol requeue $SLURM_JOB_ID` puts the job back in the queue; its
rerun resumes from the checkpoint (checkpoint.resume: auto). With checkpoint.requeue=auto
that happens for SIGUSR1/SIGUSR2, the time-limit warning, and not for SIGTERM: that comes
from scancel (the user wants the job gone) or from Slurm preempting it, and Slurm requeues
preempted jobs itself when its PreemptMode says so.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Literal

import torch

from gptrain.distributed import all_reduce_sum, is_main

log = logging.getLogger("gptrain.checkpoint")

# EX_TEMPFAIL from sysexits.h: "a temporary failure; the user is invited to retry". Launchers
# and job scripts can tell "stopped early, resumable" apart from success (0) and errors.
PREEMPTED_EXIT_CODE = 75
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@dataclass(frozen=True)
class Preemption:
    """What the ranks agreed on: which signals arrived (on any rank) and when, as seen here."""

    signals: tuple[signal.Signals, ...]
    received_at: float  # time.monotonic() of this rank's own signal, or of the agreement

    def seconds_since_signal(self) -> float:
        return time.monotonic() - self.received_at

    def describe(self) -> str:
        return "/".join(s.name for s in self.signals)


class PreemptionHandler:
    """Installs the signal handlers for the duration of a `with` block."""

    def __init__(self, device: torch.device):
        self.device = device  # the collective's tensor lives where the backend wants it (CUDA for NCCL)
        self._received: dict[signal.Signals, float] = {}
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> PreemptionHandler:
        for signum in PREEMPTION_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _record(self, signum: int, frame) -> None:
        # Runs between two bytecodes of the main thread: record, nothing else.
        self._received.setdefault(signal.Signals(signum), time.monotonic())

    def agree(self) -> Preemption | None:
        """Call at every step boundary on every rank (it is a collective): the preemption
        that some rank received, or None."""
        counts = torch.tensor([float(s in self._received) for s in PREEMPTION_SIGNALS], device=self.device)
        counts = all_reduce_sum(counts).tolist()
        signals = tuple(s for s, count in zip(PREEMPTION_SIGNALS, counts) if count > 0)
        if not signals:
            return None
        received_at = min(self._received.values()) if self._received else time.monotonic()
        return Preemption(signals=signals, received_at=received_at)


def should_requeue(preemption: Preemption, setting: bool | Literal["auto"], environ=os.environ) -> bool:
    """Whether to requeue the Slurm job after the preemption save (see the module docstring)."""
    if "SLURM_JOB_ID" not in environ or setting is False:
        return False
    if setting is True:
        return True
    return signal.SIGTERM not in preemption.signals


def requeue_slurm_job(environ=os.environ) -> bool:
    """`scontrol requeue $SLURM_JOB_ID`, from rank 0 only (once per job). True if it worked."""
    if not is_main():
        return False
    job_id = environ["SLURM_JOB_ID"]
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.error("could not requeue Slurm job %s: %s", job_id, err)
        return False
    if result.returncode != 0:
        log.error("scontrol requeue %s failed (exit %d): %s", job_id, result.returncode, result.stderr.strip())
        return False
    log.info("requeued Slurm job %s: its rerun resumes from the checkpoint", job_id)
    return True
