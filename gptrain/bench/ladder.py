"""The rungs of the ladder and how one rung is measured.

Each rung switches on one more optimization over the rung before it (the reference book's
bonus 10, ch05/10_llm-training-speed), starting from the book's chapter-5 implementation:

    baseline      stored causal mask + softmax attention, separate Q/K/V matmuls, fp32,
                  per-tensor AdamW, 50,257-row embedding and head, eager, batch B, 1 process
    sdpa          scaled_dot_product_attention, causal mask implicit (flash kernels on GPU)
    fused-qkv     Q, K and V in one matmul
    bf16          bf16 compute, the trainer's default train.bf16_mode (one process: a bf16
                  copy of the fp32 weights; the DDP rungs autocast, FSDP casts by its policy);
                  weights and optimizer state stay fp32. On CUDA the fp32 rungs before it
                  already run their matmuls in TF32, as the trainer always enables it (the
                  book's "tensor cores" step)
    fused-adamw   AdamW's fused kernel (one pass per parameter)
    vocab-pad     embedding and head padded to 50,304 rows (a multiple of 64)
    compile       torch.compile of the model
    batch-xK      K times the micro-batch
    ddp-2         2 processes, DistributedDataParallel (gloo on CPU, NCCL on CUDA)
    fsdp-2        2 processes, FSDP2 instead of DDP

Every rung is a `RunConfig` trained by gptrain's own `Trainer.train_step` (the model, the
optimizer, gptrain.train.parallelize's wrapping), in fresh processes: one per rank, started the
way `gptrain launch` starts ranks (its worker environment), so that peak memory is the rung's
own and nothing compiled or allocated by an earlier rung is reused. On CPU the ranks of a
2-process rung share the machine's cores (each gets half the threads): the rungs all use the
same hardware, and the multi-process rungs show what splitting it into ranks costs or gains.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from gptrain.errors import GptrainError


@dataclass(frozen=True)
class Settings:
    """What a rung runs with; the fields are the switches the ladder turns."""

    attention: str = "masked"
    fused_qkv: bool = False
    dtype: str = "fp32"
    fused_adamw: bool = False
    vocab_pad_multiple: int = 1
    compile: bool = False
    batch_multiplier: int = 1
    world_size: int = 1
    parallelism: str = "ddp"


@dataclass(frozen=True)
class Rung:
    name: str
    change: str  # what this rung switches on, for the table
    settings: Settings


def ladder(batch_multiplier: int) -> list[Rung]:
    """The rungs in order, each with the settings of all rungs before it plus its own change."""
    steps: list[tuple[str, str, dict[str, Any]]] = [
        ("baseline", "stored causal mask, separate Q/K/V, fp32, AdamW, vocab 50,257, eager", {}),
        ("sdpa", "scaled_dot_product_attention (no stored mask)", {"attention": "sdpa"}),
        ("fused-qkv", "one Q/K/V matmul", {"fused_qkv": True}),
        ("bf16", "bf16 compute (fp32 master weights)", {"dtype": "bf16"}),
        ("fused-adamw", "fused AdamW kernel", {"fused_adamw": True}),
        ("vocab-pad", "vocabulary padded 50,257 -> 50,304", {"vocab_pad_multiple": 64}),
        ("compile", "torch.compile", {"compile": True}),
        (f"batch-x{batch_multiplier}", f"{batch_multiplier}x micro-batch", {"batch_multiplier": batch_multiplier}),
        ("ddp-2", "2 ranks, DDP", {"world_size": 2}),
        ("fsdp-2", "2 ranks, FSDP2", {"parallelism": "fsdp"}),
    ]
    rungs, settings = [], Settings()
    for name, change, switches in steps:
        settings = dataclasses.replace(settings, **switches)
        rungs.append(Rung(name, change, settings))
    return rungs


@dataclass(frozen=True)
class Workload:
    """What every rung trains on: the model, the shape and how long it is timed."""

    device: str
    model: str
    context_length: int
    micro_batch_size: int
    warmup_steps: int
    steps: int
    threads: int  # CPU: intra-op threads of the whole machine, split between the ranks


def run_config(rung: Rung, workload: Workload, dataset: str, run_dir: str):
    """The RunConfig of `rung`: the trainer's own config, with the rung's switches."""
    from gptrain.config import RunConfig

    s = rung.settings
    return RunConfig.from_dict({
        "model": {
            "name": workload.model, "context_length": workload.context_length, "dropout": 0.0,
            "attention": s.attention, "fused_qkv": s.fused_qkv, "vocab_pad_multiple": s.vocab_pad_multiple,
        },
        "data": {"path": dataset},
        "optim": {"fused": s.fused_adamw},
        "schedule": {"kind": "constant", "warmup_steps": 0},
        "train": {
            "run_dir": run_dir, "max_steps": workload.warmup_steps + workload.steps,
            "micro_batch_size": workload.micro_batch_size * s.batch_multiplier, "device": workload.device,
            "dtype": s.dtype, "compile": s.compile, "parallelism": s.parallelism,
        },
        "eval": {"every": 0},
        "checkpoint": {"resume": "none"},
        "logging": {"jsonl": False, "plot": False, "wandb": False},
        "comm": {"init_timeout_s": 120.0, "timeout_s": 600.0},
    })


def measure_rank(rung: Rung, workload: Workload, dataset: str, run_dir: str, env_vars: dict[str, str],
                 result_path: str) -> None:
    """One rank of one rung, in its own process: warm up, time `steps` optimizer steps, and
    write this rank's measurement to `result_path` (JSON)."""
    os.environ.update(env_vars)
    import torch

    from gptrain.distributed import barrier, destroy_distributed, init_distributed
    from gptrain.train.metrics import peak_memory_gib
    from gptrain.train.trainer import Trainer

    if workload.device == "cpu":
        torch.set_num_threads(max(1, workload.threads // rung.settings.world_size))
    config = run_config(rung, workload, dataset, run_dir)
    env = init_distributed(workload.device, init_timeout_s=config.comm.init_timeout_s, timeout_s=config.comm.timeout_s)
    try:
        trainer = Trainer(config, env)
        synchronize = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
        for _ in range(workload.warmup_steps):  # allocation, autotuning, compilation
            loss, _, _ = trainer.train_step()
        loss.item()  # the steps queued on the GPU are done
        synchronize()
        barrier()  # all ranks start the clock together
        start = time.perf_counter()
        for _ in range(workload.steps):
            loss, _, _ = trainer.train_step()
        loss.item()
        synchronize()
        elapsed = time.perf_counter() - start
        result = {  # tokens: of all ranks together (Trainer.tokens_per_step counts every rank's windows)
            "rank": env.rank, "seconds": elapsed, "tokens": trainer.tokens_per_step * workload.steps,
            "loss": loss.item(), "peak_memory_gib": peak_memory_gib(trainer.device),
            "dtype": trainer.dtype, "description": trainer.parallel.description,
            "device_name": torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else "cpu",
        }
    finally:
        destroy_distributed()
    with open(result_path, "w") as handle:
        json.dump(result, handle)


def check_workload(workload: Workload) -> None:
    for key in ("context_length", "micro_batch_size", "steps", "threads"):
        if getattr(workload, key) < 1:
            raise GptrainError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(workload, key)}")
    if workload.warmup_steps < 1:
        raise GptrainError(
            f"--warmup-steps must be >= 1 (the first step compiles and allocates), got {workload.warmup_steps}"
        )
