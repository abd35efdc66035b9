"""Checkpoint cost on CPU: a synchronous save against the training stall of an async save.

The state is GPT-2 124M with its AdamW moments (about 1.5 GB of fp32 tensors) and a real
data loader, saved by gptrain's Checkpointer exactly as the trainer saves it: DCP shards,
config, commit marker. A synchronous save holds training up for the whole write; an async
save only for copying the state to CPU memory, then writes in a background thread.

    .venv/bin/python benchmarks/bench_checkpoint.py [--dir DIR_OR_URL] [--repeats 3] [--threads 2]

Without --dir the checkpoints go to a temporary folder on local disk; a URL such as
s3://bucket/prefix measures object storage instead. The data loader reads a few books of
the shared test mirror (prepared into a temporary folder) unless --data names a dataset.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

import torch

from bench_trainer import prepare_dataset
from gptrain import storage
from gptrain.checkpoint import commit as commits
from gptrain.checkpoint.checkpointer import Checkpointer
from gptrain.config import RunConfig
from gptrain.data.loader import TokenDataset, TokenLoader
from gptrain.models.transformer import Transformer
from gptrain.train.optim import build_optimizer
from gptrain.train.trainer import TrainState


def measure(run_dir: str, dataset: TokenDataset, repeats: int) -> tuple[list[float], list[float], list[float], int]:
    """(sync save seconds, async stall seconds, async total seconds, checkpoint bytes)."""
    config = RunConfig.from_dict({
        "model": {"name": "gpt2-124m"},
        "data": {"path": dataset.url},
        "train": {"run_dir": run_dir, "max_steps": 1000, "micro_batch_size": 1, "device": "cpu"},
        "checkpoint": {"every": 1, "keep_last": 2},
    })
    model = Transformer(config.model.resolve())
    context = config.model.resolve().context_length
    state = TrainState(model, build_optimizer(model, config.optim, "cpu"), TokenLoader(dataset, context, 1))
    # One short training step, so that the AdamW moments exist, as in any checkpoint after step 0.
    x, y = state.loader.next_batch()
    torch.nn.functional.cross_entropy(model(x[:, :64]).flatten(0, 1), y[:, :64].flatten()).backward()
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    checkpointer = Checkpointer(config, dataset, torch.device("cpu"))
    sync, stall, total = [], [], []
    for _ in range(repeats):
        state.step += 1
        sync.append(checkpointer.save(state, blocking=True).stall_s)
        state.step += 1
        report = checkpointer.save(state, blocking=False)
        checkpointer.wait()  # the next save would wait for it too: time it apart from the stall
        stall.append(report.stall_s)
        total.append(report.total_s)
    checkpointer.close()
    newest = commits.committed(run_dir)[-1]
    return sync, stall, total, sum(f.size for f in newest.files.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="where to write the checkpoints (default: a temporary local folder)")
    parser.add_argument("--data", help="prepared dataset (default: a few books from the test mirror)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as tmp:
        dataset = TokenDataset(args.data or prepare_dataset(Path(tmp)))
        run_dir = args.dir or storage.join(tmp, "run")
        sync, stall, total, size = measure(run_dir, dataset, args.repeats)
    sync_s, stall_s, total_s = statistics.median(sync), statistics.median(stall), statistics.median(total)
    print(f"\nGPT-2 124M + AdamW state, {size / 1e9:.2f} GB per checkpoint, {args.threads} thread(s), "
          f"median of {args.repeats}:")
    print(f"  synchronous save (training stalled):   {sync_s:7.2f} s  ({size / 1e6 / sync_s:,.0f} MB/s)")
    print(f"  async save, training stalled:          {stall_s:7.2f} s  (staging to CPU memory)")
    print(f"  async save, background until commit:   {total_s:7.2f} s")
    print(f"  stall ratio sync / async:              {sync_s / stall_s:7.1f} x")


if __name__ == "__main__":
    main()
