"""Helpers shared by test_checkpoint.py and test_resume.py: a tiny prepared dataset, a tiny
model config, and a minimal in-process training loop around a real Checkpointer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gptrain.config import RunConfig
from gptrain.data.loader import TokenDataset, TokenLoader
from gptrain.data.prepare import PrepareConfig, run_prepare
from gptrain.models.transformer import Transformer
from prepare_fixtures import raw_dir

CONTEXT = 32
# A 2-layer, 16-wide GPT-2 with the real vocabulary (the dataset is GPT-2-tokenized), with
# dropout on so that resuming must restore the RNG streams to reproduce the losses.
TINY_MODEL = {"name": "gpt2-tiny", "context_length": CONTEXT, "d_model": 16, "n_heads": 2, "d_ff": 32, "dropout": 0.1}


def prepare_dataset(root: Path) -> Path:
    """A real prepared dataset (six small books, ~2k training tokens, ~60 windows of 33 tokens)."""
    raw_dir(root / "raw", extra_books=4)
    out = root / "data"
    run_prepare(PrepareConfig(input=str(root / "raw"), out=str(out), workers=1, shard_tokens=2000, val_fraction=0.3))
    return out


def run_config(run_dir: str, data: str | Path, *, steps: int = 10, **checkpoint) -> RunConfig:
    return RunConfig.from_dict({
        "model": TINY_MODEL,
        "data": {"path": str(data)},
        "optim": {"lr": 3e-3, "fused": False},
        "train": {"run_dir": str(run_dir), "max_steps": steps, "micro_batch_size": 2, "device": "cpu"},
        "checkpoint": {"every": 3, **checkpoint},
    })


@dataclass
class TinyState:
    """The fields a Checkpointer saves (the trainer's TrainState has the same ones)."""

    model: Transformer
    optimizer: torch.optim.Optimizer
    loader: TokenLoader
    step: int = 0
    tokens_seen: int = 0


def build_state(config: RunConfig) -> tuple[TinyState, TokenDataset]:
    torch.manual_seed(config.train.seed)
    model = Transformer(config.model.resolve())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr)
    dataset = TokenDataset(config.data.path)
    loader = TokenLoader(dataset, CONTEXT, config.train.micro_batch_size, seed=config.train.seed)
    return TinyState(model, optimizer, loader), dataset


def train_until(state: TinyState, checkpointer, stop: int) -> list[float]:
    """Optimizer steps up to `stop`, saving when the checkpointer says so; returns the losses."""
    losses = []
    while state.step < stop:
        x, y = state.loader.next_batch()
        loss = F.cross_entropy(state.model(x).flatten(0, 1), y.flatten())
        loss.backward()
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens_seen += x.numel()
        losses.append(loss.item())
        if checkpointer.due(state.step):
            checkpointer.save(state)
    return losses


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
