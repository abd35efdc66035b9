"""Numerics of the bf16 modes and dropout masks: the default (`train.bf16_mode=bf16_copy`,
compiled with hash dropout masks) against the previous default (`autocast`, aten's masks), on
real training runs of the same data, seed and steps.

Two models, each trained from scratch on books from the shared test mirror:

    debug   the debug preset (gpt2-tiny, 2 layers, d_model 64: 3.3M parameters), 200 steps
    26m     the debug preset's run with a 4-layer, d_model-384 GPT-2 (26.4M parameters),
            lr 1e-3, micro-batch 4 x 64 tokens, 80 steps

Both with `train.dtype=bf16` and the fused AdamW (the defaults on a CPU with native bf16;
the debug preset itself pins fp32 and the unfused AdamW for reproducible smoke tests), and
with dropout 0.1 as the GPT-2 124M preset trains (`--dropout`). The default mode runs eager,
then compiled as the GPT-2 presets train, with aten's dropout masks and then with the
counter-hash masks that compiled CPU graphs use by default (gptrain/models/dropout.py). Each
run's end points are printed: the last logged training loss and the final validation loss,
and the relative difference of each mode's validation loss to the previous default's.

    .venv/bin/python benchmarks/bench_precision.py [--data DATASET] [--models debug,26m] [--dropout 0.1]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from bench_trainer import prepare_dataset

from gptrain.config import load_config
from gptrain.train.trainer import train

MODELS = {
    "debug": [],
    "26m": [
        "model.name=gpt2-small-test", "model.n_layers=4", "model.d_model=384", "model.n_heads=6",
        "model.d_ff=1536", "optim.lr=1e-3", "train.max_steps=80", "schedule.warmup_steps=10",
        "schedule.initial_lr=1e-4", "schedule.min_lr=1e-4",
    ],
}
MODES = {
    "bf16 autocast (previous default)": ["train.dtype=bf16", "train.bf16_mode=autocast"],
    "bf16 bf16_copy, eager": ["train.dtype=bf16", "train.bf16_mode=bf16_copy"],
    # Compiled as the 124M preset runs it (the loss too): with aten's dropout masks, then the hash's.
    "bf16 bf16_copy, compiled, aten masks": [
        "train.dtype=bf16", "train.bf16_mode=bf16_copy", "train.compile=true", "model.dropout_masks=aten",
    ],
    "bf16 bf16_copy, compiled (default)": ["train.dtype=bf16", "train.bf16_mode=bf16_copy", "train.compile=true"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="prepared dataset (default: a few books from the test mirror)")
    parser.add_argument("--models", default=",".join(MODELS), help="(default: %(default)s)")
    parser.add_argument("--dropout", type=float, default=0.1, help="model.dropout (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or prepare_dataset(Path(tmp))
        for model in args.models.split(","):
            results = {}
            for index, (mode, overrides) in enumerate(MODES.items()):
                config = load_config("debug", [
                    f"data.path={data}", f"train.run_dir={Path(tmp) / model / str(index)}", "optim.fused=auto",
                    "eval.sample_max_new_tokens=0", "logging.plot=false", f"model.dropout={args.dropout}",
                    *MODELS[model], *overrides,
                ])
                summary = train(config)
                results[mode] = summary
                print(f"{model} {mode:<38} steps {summary['steps']}: train loss {summary['train_loss']:.4f}, "
                      f"val loss {summary['first_val_loss']:.4f} -> {summary['val_loss']:.4f}", flush=True)
            previous = results["bf16 autocast (previous default)"]["val_loss"]
            for mode, summary in results.items():
                print(f"  {model} {mode:<38} final val loss {summary['val_loss']:.4f}: "
                      f"{100 * (summary['val_loss'] / previous - 1):+.2f}% against the previous default", flush=True)


if __name__ == "__main__":
    main()
