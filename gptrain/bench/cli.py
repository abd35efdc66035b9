"""`gptrain bench`: the reference book's training-speed ladder (bonus 10), with gptrain's trainer.

    gptrain bench                                 # CPU: a small GPT-2, a few minutes on 2 cores
    gptrain bench --device cuda --out bench-cuda  # GPT-2 124M, context 1024
    gptrain bench --model gpt2-124m --context-length 256 --steps 3 --out bench-124m

Rungs, each adding one optimization to the one before (gptrain.bench.ladder): the book's
chapter-5 implementation (stored causal mask, separate Q/K/V, fp32, per-tensor AdamW,
unpadded vocabulary, eager) -> SDPA -> fused QKV -> bf16 -> fused AdamW -> vocabulary padded
to 50,304 -> torch.compile -> a larger batch -> 2 ranks with DDP -> 2 ranks with FSDP2. Each
is trained by gptrain's own Trainer.train_step in fresh processes, and prints tokens/s (all
ranks), MFU and peak memory; OUT gets bench.md (the table), bench.png (the chart) and
bench.json, rewritten after every rung.

MFU = FLOPs per token (6N + attention, ModelConfig.flops_per_token) x tokens/s / peak. The
peak: on CUDA, the GPU's dense bf16 tensor-core peak (gptrain/train/metrics.py's table) for
every rung, as the reference and nanoGPT count it; on CPU, measured here: the best rate of
large matmuls in bf16 and in fp32 over the machine's threads (--peak-tflops gives your own).
Peak memory: CUDA, torch.cuda.max_memory_allocated; CPU, each rank's peak resident set size
(a fresh process per rank, so it is the rung's own, interpreter and torch included). The
2-rank rungs need 2 GPUs on CUDA (skipped otherwise); on CPU the ranks share the cores.
"""

from __future__ import annotations

import argparse
import os
import shlex

from gptrain.cli import add_documented_command
from gptrain.errors import GptrainError

# (model, context, micro-batch, batch multiplier of the larger-batch rung, warm-up steps, timed steps)
DEFAULTS = {
    "cpu": ("gpt2-small-test", 128, 4, 4, 2, 5),
    # The reference's setup and rungs on one GPU: 124M, context 1024; torch.compile needs warm-up steps.
    "cuda": ("gpt2-124m", 1024, 8, 4, 5, 20),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_documented_command(
        subparsers, "bench", "the training-speed ladder: tokens/s, MFU and memory per optimization", __doc__
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: %(default)s")
    parser.add_argument("--out", default="bench", help="folder or URL for bench.md/.png/.json (default: %(default)s)")
    parser.add_argument("--model", help="model preset (cpu: gpt2-small-test, cuda: gpt2-124m)")
    parser.add_argument("--context-length", type=int, help="tokens per window (cpu: 128, cuda: 1024)")
    parser.add_argument("--micro-batch-size", type=int, help="windows per rank and step (cpu: 4, cuda: 8)")
    parser.add_argument("--batch-multiplier", type=int, help="the larger-batch rung's factor (default: 4)")
    parser.add_argument("--warmup-steps", type=int, help="untimed steps first (cpu: 2, cuda: 5)")
    parser.add_argument("--steps", type=int, help="timed optimizer steps per rung (cpu: 5, cuda: 20)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="CPU threads in all, split between the ranks (default: this process's CPUs, %(default)s)")
    parser.add_argument("--rungs",
                        help="comma-separated rung names to run (default: all); the settings stay cumulative")
    parser.add_argument("--peak-tflops", type=float, help="the peak for MFU, per device (default: see above)")
    parser.add_argument("--time-budget-s", type=float,
                        help="start no rung after this many seconds (the rest are reported skipped)")
    parser.add_argument("--rung-timeout-s", type=float, default=900.0,
                        help="stop a rung that runs longer (reported failed; default: %(default)s)")
    parser.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from gptrain.bench.ladder import Workload, check_workload, ladder
    from gptrain.bench.peak import peak_for
    from gptrain.bench.run import run_ladder

    model, context, batch, multiplier, warmup, steps = DEFAULTS[args.device]
    workload = Workload(
        device=args.device, model=args.model or model, context_length=args.context_length or context,
        micro_batch_size=args.micro_batch_size or batch, warmup_steps=_given(args.warmup_steps, warmup),
        steps=args.steps or steps, threads=args.threads,
    )
    check_workload(workload)
    multiplier = _given(args.batch_multiplier, multiplier)
    if multiplier < 2:
        raise GptrainError(f"--batch-multiplier must be >= 2 (the larger-batch rung), got {multiplier}")
    rungs = ladder(multiplier)
    if args.rungs:
        wanted = [name.strip() for name in args.rungs.split(",") if name.strip()]
        unknown = sorted(set(wanted) - {r.name for r in rungs})
        if unknown:
            raise GptrainError(f"--rungs: unknown {unknown}; the rungs are {', '.join(r.name for r in rungs)}")
        rungs = [r for r in rungs if r.name in wanted]
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise GptrainError("--device cuda: no CUDA device is available")
    peak = peak_for(args.device, args.threads, args.peak_tflops)
    print(f"MFU against {peak[0] / 1e12:.2f} TFLOP/s per device: {peak[1]}", flush=True)
    # The command with every setting spelled out, for the report: it reruns this exact ladder.
    command = shlex.join([
        "gptrain", "bench", "--device", workload.device, "--model", workload.model,
        "--context-length", str(workload.context_length), "--micro-batch-size", str(workload.micro_batch_size),
        "--batch-multiplier", str(multiplier), "--warmup-steps", str(workload.warmup_steps),
        "--steps", str(workload.steps), "--threads", str(workload.threads),
        *(["--rungs", args.rungs] if args.rungs else []),
    ])
    return run_ladder(rungs, workload, args.out, peak, command, args.time_budget_s, args.rung_timeout_s)


def _given(value: int | None, default: int) -> int:
    return default if value is None else value
