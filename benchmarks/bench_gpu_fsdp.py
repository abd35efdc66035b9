"""One GPU, the Llama preset: FSDP2 + torch.compile + bf16 throughput, MFU and peak memory.

Trains the `llama-1b-gutenberg` preset (FSDP2, bf16 compute with fp32 master weights,
selective activation checkpointing, torch.compile) shrunk to fit one GPU comfortably (by
default 8 of its 16 blocks, micro-batch 8 x 2048 tokens, no accumulation) with the real
trainer, `Trainer(config, env).train_step()`, as `gptrain train` runs it. FSDP needs a
process group: this script makes a one-rank NCCL group, so the FSDP path (per-block
fully_shard, mixed-precision policy, compiled blocks) runs as on a cluster, over one rank.

It reports tokens/s and MFU (gptrain.train.metrics: dense bf16 peak of the GPU) over the
timed steps after the warm-up steps (compilation), torch.cuda.max_memory_allocated, and
`gptrain plan`'s estimate for the same config. Budget: well under 8 minutes on an H100/H200
(compilation ~1-2 min, data preparation ~20 s).

    .venv/bin/python benchmarks/bench_gpu_fsdp.py [--data DATASET] [--layers 8] [--steps 40]

Without --data, five books of the test mirror (../shared/gutenberg-mirror, or shared/ in the
checkout) are prepared with gptrain's pipeline into a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench_trainer import MIRROR, prepare_dataset
from gptrain.config import load_config
from gptrain.distributed import DistEnv
from gptrain.train.metrics import gpu_peak_flops, mfu
from gptrain.train.plan import GIB, plan_memory
from gptrain.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--data", help="a prepared dataset (default: five books of the test mirror)")
    parser.add_argument("--layers", type=int, default=8, help="blocks of the 16 kept (default 8)")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_fsdp.py needs a CUDA GPU")
    torch.cuda.set_device(0)
    # A one-rank process group: FSDP shards over the group's ranks, here just this one.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        with tempfile.TemporaryDirectory(prefix="gptrain-gpu-bench-") as tmp:
            data = args.data or _prepare(Path(tmp))
            return _run(args, data, Path(tmp))
    finally:
        dist.destroy_process_group()


def _prepare(tmp: Path) -> str:
    for mirror in (MIRROR, REPO / "shared" / "gutenberg-mirror"):
        if mirror.exists():
            return prepare_dataset(tmp, mirror)
    raise SystemExit(f"no --data, and no test mirror at {MIRROR} or {REPO / 'shared' / 'gutenberg-mirror'}")


def _run(args: argparse.Namespace, data: str, tmp: Path) -> int:
    steps = args.warmup + args.steps
    config = load_config("llama-1b-gutenberg", [
        f"data.path={data}", f"train.run_dir={tmp / 'run'}", f"model.n_layers={args.layers}",
        f"train.micro_batch_size={args.micro_batch}", "train.grad_accum_steps=1", "train.max_tokens=null",
        f"train.max_steps={steps}", f"schedule.warmup_steps={min(10, steps)}", "train.device=cuda", "logging.plot=false",
        "eval.every=0", "checkpoint.every=0", "checkpoint.keep_every=0",
    ])
    trainer = Trainer(config, DistEnv())
    print(f"{torch.cuda.get_device_name(0)}: {config.model.name} with {args.layers} blocks, "
          f"{trainer.parallel.description}; {trainer.tokens_per_step:,} tokens per step")
    start = time.perf_counter()
    for _ in range(args.warmup):
        trainer.train_step()
    torch.cuda.synchronize()
    print(f"warm-up ({args.warmup} steps, compilation included): {time.perf_counter() - start:.1f} s")
    torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(args.steps):
        begin = time.perf_counter()
        loss, _, _ = trainer.train_step()
        loss.item()  # waits for the step
        seconds.append(time.perf_counter() - begin)
    step_s = statistics.median(seconds)
    tokens_per_s = trainer.tokens_per_step / step_s
    peak = gpu_peak_flops(torch.cuda.get_device_name(0), "bf16")
    utilization = mfu(trainer.flops_per_token, tokens_per_s, peak, 1)
    measured = torch.cuda.max_memory_allocated() / GIB
    planned = plan_memory(config, 1, "cuda").total / GIB
    mfu_text = f"MFU {utilization:.1%}" if utilization is not None else "MFU n/a"
    print(f"median step {step_s * 1e3:.1f} ms over {args.steps} steps: {tokens_per_s:,.0f} tokens/s, "
          f"{mfu_text} ({peak.describe()})")
    print(f"peak memory allocated {measured:.2f} GiB; gptrain plan estimates {planned:.2f} GiB "
          f"({planned / measured - 1:+.0%}); final loss {loss.item():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
