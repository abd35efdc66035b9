"""CPU training throughput: gptrain's trainer against a baseline built the reference book's way.

The baseline is a GPT-2 written as in Raschka's "Build a Large Language Model (From
Scratch)", ch. 3-5: fp32, separate Q/K/V linears, hand-written softmax attention with an
explicit causal mask stored as a buffer, hand-written LayerNorm and GELU, and plain
`torch.optim.AdamW` over all parameters. It has the same shape and parameter count as the
trainer's model (same layers, widths, context, vocabulary, and tied embeddings), trains on
the same windows with the same micro-batch and the same number of threads, in this process.

The trainer runs its own optimizer step (`Trainer.train_step`: accumulation, clipping, the
schedule) as configured by default (`train.dtype=auto`: bf16 autocast on CPUs with native bf16,
AVX512-BF16 or AMX, fp32 elsewhere), and also pinned to fp32. Steps of all contenders are
interleaved, after warm-up steps that absorb one-time costs (allocation, compilation). Each
contender's fastest step counts, by wall clock and by CPU time (all threads of this process):
on a shared machine, other work only ever adds time, and it inflates wall clock more than CPU.
The default size is GPT-2 124M with its 1024-token context, the model the project trains;
tiny models spend most of their time in the 50,257-way output layer and its softmax, which
are the same in both implementations. At 124M, fp32, both spend most of a step in the same
matrix multiplications: on 2 cores these alone take ~0.6 of the baseline's step, so no fp32
implementation can be more than ~1.7x faster than it there; bf16 lowers that floor where the
cores multiply bf16 natively.

    .venv/bin/python benchmarks/bench_trainer.py [--data DATASET] [--model gpt2-124m] [--threads 2]

Without --data, a dataset is prepared from the shared test mirror into a temporary folder.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from gptrain.config import load_config
from gptrain.data.loader import TokenDataset, TokenLoader
from gptrain.distributed import DistEnv
from gptrain.models.config import ModelConfig
from gptrain.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO.parent / "shared" / "gutenberg-mirror"


class ReferenceLayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class ReferenceGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


class ReferenceAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, context_length: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.W_query = nn.Linear(d_model, d_model, bias=True)
        self.W_key = nn.Linear(d_model, d_model, bias=True)
        self.W_value = nn.Linear(d_model, d_model, bias=True)
        self.out_proj = nn.Linear(d_model, d_model)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        b, t, d = x.shape
        queries = self.W_query(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        keys = self.W_key(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        scores = queries @ keys.transpose(2, 3)
        scores.masked_fill_(self.mask.bool()[:t, :t], -torch.inf)
        weights = torch.softmax(scores / keys.shape[-1] ** 0.5, dim=-1)
        context = (weights @ values).transpose(1, 2).contiguous().view(b, t, d)
        return self.out_proj(context)


class ReferenceBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm1 = ReferenceLayerNorm(config.d_model)
        self.att = ReferenceAttention(config.d_model, config.n_heads, config.context_length)
        self.norm2 = ReferenceLayerNorm(config.d_model)
        self.ff = nn.Sequential(
            nn.Linear(config.d_model, config.d_ff), ReferenceGELU(), nn.Linear(config.d_ff, config.d_model)
        )

    def forward(self, x):
        x = x + self.att(self.norm1(x))
        return x + self.ff(self.norm2(x))


class ReferenceGPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.context_length, config.d_model)
        self.trf_blocks = nn.Sequential(*[ReferenceBlock(config) for _ in range(config.n_layers)])
        self.final_norm = ReferenceLayerNorm(config.d_model)
        self.out_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.out_head.weight = self.tok_emb.weight  # tied, like the trainer's GPT-2: same parameter count

    def forward(self, idx):
        t = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device))
        return self.out_head(self.final_norm(self.trf_blocks(x)))


def baseline_step(config, dataset: TokenDataset) -> Callable[[], None]:
    """One training step of the reference-style model per call: forward, loss, backward, AdamW."""
    model_config = config.model.resolve()
    torch.manual_seed(config.train.seed)
    model = ReferenceGPT(model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    loader = TokenLoader(dataset, model_config.context_length, config.train.micro_batch_size, seed=config.train.seed)

    def step() -> None:
        x, y = loader.next_batch()
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def trainer_step(config) -> Callable[[], None]:
    """One optimizer step of gptrain's Trainer per call (`Trainer.train_step`, as `fit` runs it)."""
    trainer = Trainer(config, DistEnv())
    return lambda: trainer.train_step()


def prepare_dataset(out: Path, mirror: Path = MIRROR) -> str:
    """Five books from the test mirror, downloaded and prepared with gptrain's data pipeline."""
    from gptrain.data.download import DownloadConfig, download
    from gptrain.data.prepare import PrepareConfig, run_prepare

    raw = out / "raw"
    download(DownloadConfig(out=str(raw), mirror=str(mirror), ids=(11, 35, 41, 43, 46), rate=0))
    run_prepare(PrepareConfig(input=str(raw), out=str(out / "data"), languages=(), val_fraction=0.3, workers=1))
    return str(out / "data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="prepared dataset (default: a few books from the test mirror)")
    parser.add_argument("--model", default="gpt2-124m", help="model preset (default: %(default)s)")
    parser.add_argument("--context-length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1, help="micro-batch, in windows (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps of each; the fastest counts (default: 4)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each first (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--compile", action="store_true", help="also time the trainer with torch.compile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        dataset_path = args.data or prepare_dataset(Path(tmp))

        def config(name: str, *extra: str):
            # The debug preset pins optim.fused=false (reproducible smoke tests); the trainer's
            # default is "auto", the fused AdamW kernel on CPU and CUDA.
            return load_config("debug", [
                f"model.name={args.model}", f"model.context_length={args.context_length}",
                f"train.micro_batch_size={args.batch}", f"data.path={dataset_path}", "optim.fused=auto",
                f"train.run_dir={Path(tmp) / name}", "train.max_steps=1000000", "logging.plot=false", *extra,
            ])

        base = config("baseline")
        mc = base.model.resolve()
        print(f"model {args.model}: {mc.num_parameters():,} parameters, {mc.n_layers} layers, d_model {mc.d_model}, "
              f"context {mc.context_length}; micro-batch {args.batch}; {torch.get_num_threads()} threads; "
              f"{args.warmup} warm-up + {args.steps} timed steps each, interleaved", flush=True)
        default_dtype = config("auto", "train.dtype=auto").train.resolved_dtype("cpu")
        runs = {
            "baseline: reference-style, fp32, plain AdamW": baseline_step(base, TokenDataset(dataset_path)),
            f"trainer: default dtype (auto: {default_dtype} here)": trainer_step(config("auto", "train.dtype=auto")),
            "trainer: fp32 pinned": trainer_step(config("fp32", "train.dtype=fp32")),
        }
        if args.compile:
            runs["trainer: default dtype + torch.compile"] = trainer_step(
                config("compile", "train.dtype=auto", "train.compile=true")
            )
        # Round-robin, one step of each per round, so a change in the machine's load (shared
        # machines) hits every contender alike.
        wall = {name: [] for name in runs}
        cpu = {name: [] for name in runs}
        for round_index in range(args.warmup + args.steps):
            for name, step in runs.items():
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                step()
                if round_index >= args.warmup:
                    wall[name].append(time.perf_counter() - start_wall)
                    cpu[name].append(time.process_time() - start_cpu)
        tokens = args.batch * mc.context_length
        baseline = next(iter(runs))
        for name in runs:
            best_wall, best_cpu = min(wall[name]), min(cpu[name])
            print(f"{name:<46} {tokens / best_wall:7,.0f} tokens/s  "
                  f"{min(wall[baseline]) / best_wall:5.2f}x the baseline by wall clock, "
                  f"{min(cpu[baseline]) / best_cpu:5.2f}x by CPU time  "
                  f"(best step of {args.steps}: {best_wall:.2f} s wall, {best_cpu:.2f} s CPU)")


if __name__ == "__main__":
    main()
