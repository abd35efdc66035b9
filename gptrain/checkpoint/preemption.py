"""Preemption: catch the scheduler's warning signal, stop at a step boundary, save, exit.

Clusters warn a job before they kill it: Slurm sends SIGTERM on preemption or scancel (and
whatever `--signal=[B:]SIG@SECONDS` names, usually SIGUSR1/SIGUSR2, ahead of the time
limit); Kubernetes sends SIGTERM and waits terminationGracePeriodSeconds; `gptrain launch`
passes the signals it gets on to its workers. The handler only records which signal arrived
and when: a signal can land anywhere (inside a collective, half way through an optimizer
step), so no work may happen there. At the next step boundary every rank calls `agree()`, an
all-reduce, so all ranks stop at the same step even if only some of them were signalled; the
trainer then saves synchronously and exits with gptrain.errors.EXIT_PREEMPTED (75).

A training command records these signals from its start (`preemption_signals_recorded`, used
by gptrain.cli): one that comes while the process imports, loads data or resumes a checkpoint
is acted on at the first step boundary instead of killing it.

What happens next is the scheduler's: the Slurm batch scripts requeue the job on 75 (from the
batch shell, so images need no Slurm client), submitit requeues its jobs, Kubernetes starts
the pods again; the rerun resumes from the checkpoint (checkpoint.resume: auto).
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gptrain.distributed import all_reduce_sum

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

# Signals that came before training started, kept for the PreemptionHandler that takes over.
_received_early: dict[signal.Signals, float] = {}


@contextlib.contextmanager
def preemption_signals_recorded(restore: bool = True) -> Iterator[None]:
    """For the whole of a training command: a preemption signal is recorded instead of ending
    the process (their default action), and the trainer acts on it at its first step boundary.

    This also lets each rank end with its own status when a launcher stops the others because
    one failed (srun --kill-on-bad-exit sends SIGTERM): the others get to their own error
    (the same bad config: status 2), or to a lost peer (a crash), instead of dying by the signal,
    whose status would hide the first rank's from the scheduler. For that, a process that ends
    with the command (`restore=False`) ignores them once the command is done: Python's shutdown,
    which may take seconds, drops handlers written in Python but leaves ignored signals ignored.
    """
    previous = {signum: signal.signal(signum, _record_early) for signum in PREEMPTION_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if restore else signal.SIG_IGN)
        _received_early.clear()


def _record_early(signum: int, frame) -> None:
    _received_early.setdefault(signal.Signals(signum), time.monotonic())


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
        self._received.update(_received_early)  # those that came while the process started
        _received_early.clear()
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
