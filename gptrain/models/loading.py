"""A model and its tokenizer, ready to generate: what `gptrain generate` and `gptrain chat` load.

A weights path is an HF/Meta/reference-book layout (see gptrain.models.weights) or a gptrain
run directory, which means its newest committed checkpoint. `resolve_weights` answers where
the weights are without reading them, so a command can refuse a bad path before doing
anything slow (`gptrain chat` checks it before it starts its server).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gptrain import storage
from gptrain.errors import GptrainError

if TYPE_CHECKING:
    import torch

    from gptrain.checkpoint.commit import Commit

    from gptrain.models.transformer import Transformer
    from gptrain.tokenizer import Tokenizer


@dataclass(frozen=True)
class WeightsSource:
    path: str  # what to load: the path given, or the checkpoint folder a run directory points to
    description: str  # for people: the path given and, for a gptrain checkpoint, its step
    commit: Commit | None = None  # a gptrain checkpoint, already found and verified


@dataclass
class LoadedModel:
    model: Transformer  # in eval mode
    tokenizer: Tokenizer
    source: WeightsSource
    device: torch.device


def resolve_weights(path: str) -> WeightsSource:
    """Where the weights at `path` are; a GptrainError naming `path` when there are none."""
    from gptrain.checkpoint.export import is_gptrain_checkpoint, usable_checkpoint

    if not storage.exists(path):
        raise GptrainError(f"{path}: no such weights file, weights folder or run directory")
    if is_gptrain_checkpoint(path):
        commit = usable_checkpoint(path)
        return WeightsSource(path=commit.url, description=f"{path} (checkpoint step {commit.step})", commit=commit)
    return WeightsSource(path=path, description=path)


def load_model_and_tokenizer(
    weights: str, device: str = "auto", dtype: str | None = None, tokenizer: str | None = None
) -> LoadedModel:
    """The model at `weights` on `device` ('auto': the best available), cast to `dtype` (None
    keeps the stored dtype), with the tokenizer `tokenizer` names or the one stored with it."""
    from gptrain.checkpoint.export import load_model_from_commit
    from gptrain.device import resolve_device, resolve_dtype
    from gptrain.models.weights import load_pretrained
    from gptrain.tokenizer import tokenizer_for_model

    source = resolve_weights(weights)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if source.commit is not None:
        model = load_model_from_commit(source.commit, torch_device, torch_dtype)
    else:
        model = load_pretrained(source.path, device=torch_device, dtype=torch_dtype)
    # A run's checkpoint folder holds the tokenizer spec the run trained with.
    model_tokenizer = tokenizer_for_model(source.path, model.config.family, override=tokenizer)
    return LoadedModel(model=model, tokenizer=model_tokenizer, source=source, device=torch_device)
