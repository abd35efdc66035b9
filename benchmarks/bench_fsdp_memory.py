"""Memory per rank on CPU ranks (gloo): ddp against fsdp on 1, 2 and 4 ranks, activation
checkpointing, and `gptrain export` of an fsdp checkpoint, each against `gptrain plan`.

Each configuration runs the real trainer under torchrun (a loopback-only network namespace),
one launch per configuration. A rank measures its resident set (VmRSS/VmHWM) before the
trainer exists, resets the high-water mark once the trainer is built (each rank first builds
the whole initial model, then shards it: a start-up cost the plan does not count), runs a
few optimizer steps and reports the peak above its starting point. glibc is told to mmap
every allocation of 64 KiB or more (mallopt), so freed tensors go back to the OS and the
peak tracks the tensors alive at once, as the plan counts them. Each rank also sums the bytes
of the parameters, gradients and AdamW moments it holds (its shards under fsdp).

    .venv/bin/python benchmarks/bench_fsdp_memory.py [--data DATASET] [--layers 6]

The model is GPT-2 124M's width (d_model 768, 12 heads, the 50,257-token vocabulary) with 6
of its 12 blocks, 81M parameters: 4 ddp ranks of it need about 8 GB, which is what the
machine this was written on can spare. Training windows: 1 x 128 tokens (states dominate);
the checkpointing runs use 4 x 512 (activations dominate), on one rank and on two fsdp ranks.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MIB = 2**20
STEPS = 3


def resident_bytes() -> tuple[int, int]:
    """(current, peak) resident set of this process."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmRSS"].split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set


def mmap_large_allocations() -> None:
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)


# ---------------------------------------------------------------------------------------------
# Worker: one rank of one configuration.


def worker(config_path: str, out: str, save: str) -> None:
    mmap_large_allocations()
    from gptrain.config import load_config
    from gptrain.distributed import destroy_distributed, init_distributed
    from gptrain.train.trainer import Trainer
    from torch.distributed.tensor import DTensor

    def local_bytes(tensor) -> int:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        return local.numel() * local.element_size()

    env = init_distributed("cpu", init_timeout_s=120, timeout_s=300)
    try:
        config = load_config(config_path)
        gc.collect()
        start, _ = resident_bytes()
        trainer = Trainer(config, env)
        gc.collect()
        reset_peak()
        for _ in range(STEPS):
            trainer.train_step()
        _, peak = resident_bytes()
        state = trainer.state
        trainer.forward_backward()  # gradients to count (train_step ends with them freed)
        params = list({id(p): p for p in state.model.parameters()}.values())
        held = (sum(local_bytes(p) for p in params) + sum(local_bytes(p.grad) for p in params)
                + sum(local_bytes(s[k]) for s in state.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")))
        state.optimizer.zero_grad(set_to_none=True)
        if save == "save":  # a checkpoint for the export measurement
            trainer.checkpointer.save(state, blocking=True)
        trainer.checkpointer.close()
        Path(f"{out}.rank{env.rank}").write_text(json.dumps({"peak_above_start": peak - start, "held": held}))
    finally:
        destroy_distributed()


def export_worker(run_dir: str, out_dir: str, result: str) -> None:
    """`gptrain export` in a fresh process: its peak resident set above the start."""
    mmap_large_allocations()
    import gptrain.checkpoint.store  # noqa: F401  (imported before the start: code is not the model)
    import gptrain.models.weights  # noqa: F401
    from gptrain.checkpoint.export import export

    gc.collect()
    start, _ = resident_bytes()
    reset_peak()
    export(run_dir, out_dir)
    _, peak = resident_bytes()
    Path(result).write_text(json.dumps({"peak_above_start": peak - start}))


# ---------------------------------------------------------------------------------------------
# Driver.


def launch(ranks: int, config: Path, out: Path, save: bool) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc-per-node={ranks}",
               __file__, "--worker", str(config), str(out), "save" if save else "-"]
    # torchrun's store listens on all interfaces: a private network namespace with only loopback.
    subprocess.run(["unshare", "--net", "bash", "-c", f"ip link set lo up && exec {shlex.join(command)}"],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(ranks)]


def write_config(folder: Path, name: str, data: str, layers: int, **train) -> Path:
    config = {
        "model": {"name": "gpt2-124m", "n_layers": layers, "context_length": train.pop("context", 128), "dropout": 0.0},
        "data": {"path": data},
        "optim": {"fused": True},
        "train": {"run_dir": str(folder / name), "max_steps": 100, "micro_batch_size": 1, "device": "cpu",
                  "dtype": "fp32", **train},
        "eval": {"every": 0, "sample_max_new_tokens": 0},
        "checkpoint": {"every": 0},
        "logging": {"plot": False},
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--data", help="a prepared dataset (default: five books of the test mirror)")
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()
    from bench_trainer import prepare_dataset
    from gptrain.config import load_config
    from gptrain.train.plan import plan_memory

    with tempfile.TemporaryDirectory(prefix="gptrain-memory-bench-") as tmp:
        folder = Path(tmp)
        data = args.data or prepare_dataset(folder)
        print(f"{'run':<34}{'ranks':>6}{'measured MiB':>14}{'plan MiB':>10}{'plan/meas.':>11}"
              f"{'held states MiB':>17}{'plan states MiB':>17}")

        def report(name: str, ranks: int, config: Path) -> None:
            results = launch(ranks, config, folder / name, save=name == "fsdp-4")
            measured = max(r["peak_above_start"] for r in results)
            held = max(r["held"] for r in results)
            plan = plan_memory(load_config(str(config)), ranks, "cpu")
            print(f"{name:<34}{ranks:>6}{measured / MIB:>14.0f}{plan.total / MIB:>10.0f}"
                  f"{plan.total / measured:>11.2f}{held / MIB:>17.0f}{plan.states / MIB:>17.0f}", flush=True)

        for ranks in (1, 2, 4):
            for parallelism in ("ddp", "fsdp") if ranks > 1 else ("ddp",):
                name = f"{parallelism}-{ranks}"
                report(name, ranks, write_config(folder, name, data, args.layers, parallelism=parallelism))
        for ranks, parallelism in ((1, "ddp"), (2, "fsdp")):
            for mode in ("none", "selective", "full"):
                name = f"{parallelism}-{ranks}-checkpointing-{mode}"
                config = write_config(folder, name, data, args.layers, parallelism=parallelism,
                                      activation_checkpointing=mode, micro_batch_size=4, context=512)
                report(name, ranks, config)

        model_bytes = 4 * load_config(str(folder / "fsdp-4.json")).model.resolve().num_parameters(include_padding=True)
        result = folder / "export.json"
        subprocess.run([sys.executable, __file__, "--export", str(folder / "fsdp-4"), str(folder / "exported"),
                        str(result)], check=True, stderr=subprocess.DEVNULL)
        peak = json.loads(result.read_text())["peak_above_start"]
        print(f"gptrain export of the 4-rank fsdp checkpoint: peak {peak / MIB:.0f} MiB above start, "
              f"{peak / model_bytes:.2f}x the model's {model_bytes / MIB:.0f} MiB of fp32 weights")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(*sys.argv[2:5])
    elif sys.argv[1:2] == ["--export"]:
        export_worker(*sys.argv[2:5])
    else:
        sys.exit(main())
