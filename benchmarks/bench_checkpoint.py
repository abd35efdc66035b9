"""Checkpoint cost on CPU: a synchronous save against the training stall of an async save.

The state is GPT-2 124M with its AdamW moments (about 1.5 GB of fp32 tensors) and a real
data loader, saved by gptrain's Checkpointer exactly as the trainer saves it: DCP shards with
their sha256s, config, commit marker. Training is real too: AdamW steps on windows of
--context tokens. Each repeat, in one run:

  sync    a synchronous save, then one training step (the baseline step);
  async   an async save, then training steps until it has committed. Its stall is what the
          trainer logs: the time save() held the loop up, plus the time the first
          optimizer.step waited for the copy to CPU memory (which overlaps with that step's
          forward and backward).

A stall is only what blocks the loop: on a CPU box the background copy and write share the
cores with training, so the benchmark also prints how much slower than the baseline step the
first step after the async save ran (alongside the copy, then the start of the write; its
wait for the copy excluded) and the later steps during the background write.

    .venv/bin/python benchmarks/bench_checkpoint.py [--dir DIR_OR_URL] [--repeats 5] [--threads 2] [--context 256]

Without --dir the checkpoints go to a temporary folder on local disk; a URL such as
s3://bucket/prefix measures object storage instead. The data loader reads a few books of
the shared test mirror (prepared into a temporary folder) unless --data names a dataset.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_trainer import prepare_dataset
from gptrain import storage
from gptrain.checkpoint import commit as commits
from gptrain.checkpoint.checkpointer import Checkpointer
from gptrain.config import RunConfig
from gptrain.data.loader import TokenDataset, TokenLoader
from gptrain.models.transformer import Transformer
from gptrain.train.optim import build_optimizer
from gptrain.train.trainer import TrainState


@dataclass
class Measured:
    sync_s: list[float] = field(default_factory=list)  # synchronous save: all of it stalls
    stall_s: list[float] = field(default_factory=list)  # async save: what blocked the loop
    write_s: list[float] = field(default_factory=list)  # async save: copy + write + commit, in the background
    copy_s: list[float] = field(default_factory=list)  # async save: its copy to CPU memory, in the background
    step_s: list[float] = field(default_factory=list)  # the step after a sync save (nothing in the background)
    step_after_async_s: list[float] = field(default_factory=list)  # alongside the copy, then the write; wait excluded
    step_during_write_s: list[float] = field(default_factory=list)  # later steps while the write runs
    size: int = 0


def measure(run_dir: str, dataset: TokenDataset, repeats: int, context: int) -> Measured:
    config = RunConfig.from_dict({
        "model": {"name": "gpt2-124m"},
        "data": {"path": dataset.url},
        "train": {"run_dir": run_dir, "max_steps": 1000, "micro_batch_size": 1, "device": "cpu"},
        "checkpoint": {"every": 1, "keep_last": 2},
    })
    model = Transformer(config.model.resolve())
    state = TrainState(model, build_optimizer(model, config.optim, "cpu"),
                       TokenLoader(dataset, config.model.resolve().context_length, 1))

    def train_step() -> float:
        start = time.perf_counter()
        x, y = state.loader.next_batch()
        F.cross_entropy(model(x[:, :context]).flatten(0, 1), y[:, :context].flatten()).backward()
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        return time.perf_counter() - start

    train_step()  # the AdamW moments exist, as in any checkpoint after step 0
    checkpointer = Checkpointer(config, dataset, torch.device("cpu"))
    measured = Measured()
    for _ in range(repeats):
        measured.sync_s.append(checkpointer.save(state, blocking=True).stall_s)
        measured.step_s.append(train_step())
        report = checkpointer.save(state, blocking=False)
        blocked = report.stall_s
        step_s = train_step()  # its optimizer.step waits for the copy if the copy is not done
        measured.step_after_async_s.append(step_s - (report.stall_s - blocked))
        while checkpointer.in_flight:  # training goes on while the write runs
            measured.step_during_write_s.append(train_step())
        checkpointer.wait()  # raises if the write failed
        measured.stall_s.append(report.stall_s)
        measured.write_s.append(report.total_s)
        measured.copy_s.append(report.copy_s)
    checkpointer.close()
    newest = commits.committed(run_dir)[-1]
    measured.size = sum(f.size for f in newest.files.values())
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="where to write the checkpoints (default: a temporary local folder)")
    parser.add_argument("--data", help="prepared dataset (default: a few books from the test mirror)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--context", type=int, default=256, help="tokens per training window (batch 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as tmp:
        dataset = TokenDataset(args.data or prepare_dataset(Path(tmp)))
        run_dir = args.dir or storage.join(tmp, "run")
        m = measure(run_dir, dataset, args.repeats, args.context)
    med = statistics.median
    sync_s, stall_s, step_s = med(m.sync_s), med(m.stall_s), med(m.step_s)
    print(f"\nGPT-2 124M + AdamW state, {m.size / 1e9:.2f} GB per checkpoint, {args.threads} thread(s), "
          f"training steps of 1 x {args.context} tokens; median of {args.repeats} interleaved repeats:")
    print(f"  synchronous save, training stalled:       {sync_s:7.3f} s  ({m.size / 1e6 / sync_s:,.0f} MB/s)"
          f"   each: {' '.join(f'{s:.2f}' for s in m.sync_s)}")
    print(f"  async save, training stalled:             {stall_s:7.3f} s"
          f"   each: {' '.join(f'{s:.3f}' for s in m.stall_s)}")
    print(f"  async stall / sync save:                  {100 * stall_s / sync_s:7.1f} %"
          f"   each repeat: {' '.join(f'{100 * a / s:.1f}' for a, s in zip(m.stall_s, m.sync_s))}")
    print(f"  async save, background until commit:      {med(m.write_s):7.3f} s  "
          f"(of which the copy to CPU memory {med(m.copy_s):.3f} s)")
    print(f"  training step after a sync save:          {step_s:7.3f} s")
    print(f"  first step after the async save:          {med(m.step_after_async_s):7.3f} s  "
          f"({100 * (med(m.step_after_async_s) / step_s - 1):+.0f}%)")
    if m.step_during_write_s:
        print(f"  steps during the background write:        {med(m.step_during_write_s):7.3f} s  "
              f"({100 * (med(m.step_during_write_s) / step_s - 1):+.0f}%, {len(m.step_during_write_s)} steps)")


if __name__ == "__main__":
    main()
