"""`gptrain launch`: start this node's ranks of a run and stand between them and the scheduler.

    gptrain launch --nproc-per-node 8 -- train --config gpt2-124m-gutenberg data.path=DATASET
    gptrain launch --nnodes 2 --node-rank 1 --master-addr pretrain-0.pretrain --nproc-per-node gpu -- train ...

Starts N workers, each `gptrain COMMAND...` with the torchrun-style variables gptrain.distributed
reads (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT):
node k runs ranks k*N .. k*N+N-1, and rank 0 (on node 0) hosts the rendezvous store, decided
by the node rank given here and not by host-name matching. --nproc-per-node gpu starts one
worker per visible GPU. Each worker's output lines carry its rank ("[rank 3] ...").

Unlike torchrun it keeps gptrain's exit-status contract (gptrain.errors) and never restarts
workers itself, which is the scheduler's job (Slurm requeue, Kubernetes Job/JobSet policies):
  * SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 are passed on to every worker; the launcher then waits
    for them however long they take (their checkpoint), so the scheduler's grace period, not
    this program, decides when to stop waiting.
  * Fail fast: when a worker exits with anything but 0 or 75, the other workers are killed
    at once (a collective waiting for a lost rank may never return) and the launcher exits.
  * Its status: the status of the first worker that failed (2 for bad input, else the crash,
    128+N for death by signal N); else 75 when the workers stopped at a preemption
    checkpoint; else 0. Workers die with the launcher if it is killed.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

from gptrain.cli import add_documented_command
from gptrain.distributed import DEFAULT_MASTER_PORT
from gptrain.errors import EXIT_OK, EXIT_PREEMPTED, GptrainError, describe_status, exit_status

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
POLL_S = 0.1
_PR_SET_PDEATHSIG = 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_documented_command(
        subparsers, "launch", "start this node's ranks (one per GPU) of a gptrain command; fail-fast", __doc__
    )
    parser.add_argument("--nproc-per-node", default="1", metavar="N|gpu",
                        help="workers on this node: a number, or 'gpu' for one per visible GPU (default: 1)")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes in the run (default: 1)")
    parser.add_argument("--node-rank", type=int, default=0,
                        help="this node's rank, 0..nnodes-1; node 0 hosts rank 0 (default: 0)")
    parser.add_argument("--master-addr", default="127.0.0.1",
                        help="node 0's address or DNS name, where rank 0 listens (default: %(default)s)")
    parser.add_argument("--master-port", type=int, default=DEFAULT_MASTER_PORT,
                        help="rank 0's rendezvous port (default: %(default)s)")
    parser.add_argument("worker_command", nargs=argparse.REMAINDER, metavar="-- COMMAND...",
                        help="the gptrain command each worker runs, e.g. -- train --config debug ...")
    parser.set_defaults(func=run_launch)


@dataclass(frozen=True)
class Layout:
    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise GptrainError(f"--nproc-per-node {self.nproc_per_node}: must be >= 1")
        if self.nnodes < 1:
            raise GptrainError(f"--nnodes {self.nnodes}: must be >= 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise GptrainError(f"--node-rank {self.node_rank}: must be in 0..{self.nnodes - 1} (--nnodes)")
        if not 1 <= self.master_port <= 65535:
            raise GptrainError(f"--master-port {self.master_port}: not a TCP port")

    def worker_env(self, local_rank: int) -> dict[str, str]:
        return {
            "RANK": str(self.node_rank * self.nproc_per_node + local_rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(self.nnodes * self.nproc_per_node),
            "LOCAL_WORLD_SIZE": str(self.nproc_per_node),
            "GROUP_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def run_launch(args: argparse.Namespace) -> int:
    command = args.worker_command[1:] if args.worker_command[:1] == ["--"] else args.worker_command
    if not command:
        raise GptrainError("no command to launch: put it after --, e.g. gptrain launch --nproc-per-node 2 -- train ...")
    layout = Layout(_nproc(args.nproc_per_node), args.nnodes, args.node_rank, args.master_addr, args.master_port)
    return Launcher(layout, command).run()


def _nproc(value: str) -> int:
    if value == "gpu":
        import torch

        count = torch.cuda.device_count()
        if count == 0:
            raise GptrainError("--nproc-per-node gpu: no GPU is visible to this process")
        return count
    try:
        return int(value)
    except ValueError:
        raise GptrainError(f"--nproc-per-node {value!r}: expected a number or 'gpu'") from None


def combined_status(statuses_in_exit_order: Sequence[int]) -> int:
    """The launcher's status from its workers' (in the order they exited): the first failure
    decides, as the workers after it were stopped because of it; else 75 if any worker stopped
    at a preemption checkpoint; else 0."""
    for status in statuses_in_exit_order:
        if status not in (EXIT_OK, EXIT_PREEMPTED):
            return status
    return EXIT_PREEMPTED if EXIT_PREEMPTED in statuses_in_exit_order else EXIT_OK


class Launcher:
    def __init__(self, layout: Layout, command: list[str]):
        self.layout, self.command = layout, command
        self.workers: list[subprocess.Popen] = []
        self.statuses: dict[int, int] = {}  # local rank -> exit status
        self._readers: list[threading.Thread] = []  # relay the workers' output, labelled
        self._output_lock = threading.Lock()
        self._signals: set[int] = set()  # those passed on so far

    def log(self, message: str) -> None:
        with self._output_lock:
            print(f"gptrain launch: {message}", file=sys.stderr, flush=True)

    def run(self) -> int:
        layout = self.layout
        first = layout.node_rank * layout.nproc_per_node
        self.log(
            f"node {layout.node_rank} of {layout.nnodes}: ranks {first}-{first + layout.nproc_per_node - 1} of "
            f"{layout.nnodes * layout.nproc_per_node}, rank 0 at {layout.master_addr}:{layout.master_port}: "
            f"gptrain {' '.join(self.command)}"
        )
        previous = {signum: signal.signal(signum, self._forward) for signum in FORWARDED_SIGNALS}
        try:
            self._start_workers()
            for signum in self._signals:  # one that came while they started reaches them all
                self._send(signum)
            status = self._supervise()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._kill_workers()  # only if an error in here left some running
        self.log(f"workers exited with {[self.statuses.get(r) for r in range(len(self.workers))]}: status {status}")
        return status

    def _start_workers(self) -> None:
        labelled = self.layout.nproc_per_node > 1
        for local_rank in range(self.layout.nproc_per_node):
            env = {**os.environ, **self.layout.worker_env(local_rank)}
            env.setdefault("PYTHONUNBUFFERED", "1")  # lines reach the log as they are printed
            # Math libraries would start a thread per core in every worker.
            env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // self.layout.nproc_per_node)))
            self.workers.append(subprocess.Popen(
                [sys.executable, "-m", "gptrain", *self.command], env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if labelled else None, stderr=subprocess.STDOUT if labelled else None,
                preexec_fn=_die_with_parent,
            ))
        if labelled:  # threads only once every worker is forked: preexec_fn is unsafe once threads run
            for local_rank, worker in enumerate(self.workers):
                prefix = f"[rank {self.layout.worker_env(local_rank)['RANK']}] ".encode()
                self._readers.append(threading.Thread(target=self._relay, args=(worker.stdout, prefix), daemon=True))
                self._readers[-1].start()

    def _relay(self, stream: IO[bytes], prefix: bytes) -> None:
        out = sys.stdout.buffer
        for line in stream:
            with self._output_lock:
                try:
                    out.write(prefix + line)
                    out.flush()
                except (BrokenPipeError, ValueError):  # nobody reads the log any more: keep draining
                    pass

    def _supervise(self) -> int:
        exit_order: list[int] = []
        failed = False
        while len(exit_order) < len(self.workers):
            for local_rank, worker in enumerate(self.workers):
                if local_rank in self.statuses or worker.poll() is None:
                    continue
                status = self.statuses[local_rank] = exit_status(worker.returncode)
                exit_order.append(status)
                if status not in (EXIT_OK, EXIT_PREEMPTED) and not failed:
                    failed = True
                    rank = self.layout.worker_env(local_rank)["RANK"]
                    self.log(f"rank {rank} {describe_status(status)}: killing the other workers")
                    self._kill_workers()
            time.sleep(POLL_S)
        for reader in self._readers:
            reader.join()
        return combined_status(exit_order)

    def _forward(self, signum: int, frame) -> None:
        # The scheduler's warning or stop request is for the workers: they checkpoint and exit 75.
        self._signals.add(signum)
        self._send(signum)

    def _send(self, signum: int) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    def _kill_workers(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                worker.kill()
        for worker in self.workers:
            worker.wait()


def _die_with_parent() -> None:
    """In the forked worker before exec: SIGKILL it when the launcher dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
