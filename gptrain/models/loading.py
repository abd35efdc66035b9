"""A model and its tokenizer, ready to generate: what `gptrain generate` and `gptrain chat` load.

A weights path is an HF/OpenAI/Meta/reference-book layout (see gptrain.models.weights) or a
gptrain run directory, which means its newest committed checkpoint. `resolve_weights` answers
where the weights are without reading them, so a command can refuse a bad path before doing
anything slow (`gptrain chat` checks it before it starts its server).

Prompts are plain text that the model continues (base models), or conversations in the
Llama 3 chat template (`chat_template` "llama3"): asked for, or with "auto" chosen for
instruct weights, which are told apart by their name (Meta and Hugging Face name them
...-Instruct) or by a config.json / generation_config.json whose eos_token_id holds
<|eot_id|> (instruct models end a turn with it, base models end text with <|end_of_text|>).
"""

from __future__ import annotations

import posixpath
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


CHAT_TEMPLATES = ("auto", "llama3", "none")
INSTRUCT_CONFIG_FILES = ("generation_config.json", "config.json")


@dataclass
class LoadedModel:
    model: Transformer  # in eval mode
    tokenizer: Tokenizer
    source: WeightsSource
    device: torch.device
    chat_template: str | None = None  # "llama3", or None: prompts are text to continue


def resolve_weights(path: str, verify: bool = True) -> WeightsSource:
    """Where the weights at `path` are; a GptrainError naming `path` when there are none. A
    gptrain checkpoint is checked against its commit marker (`verify`: sha256s too)."""
    from gptrain.checkpoint.export import is_gptrain_checkpoint, usable_checkpoint

    if not storage.exists(path):
        raise GptrainError(f"{path}: no such weights file, weights folder or run directory")
    if is_gptrain_checkpoint(path):
        commit = usable_checkpoint(path, verify)
        return WeightsSource(path=commit.url, description=f"{path} (checkpoint step {commit.step})", commit=commit)
    return WeightsSource(path=path, description=path)


def load_model_and_tokenizer(
    weights: str, device: str = "auto", dtype: str | None = None, tokenizer: str | None = None,
    chat_template: str = "auto", verify: bool = True,
) -> LoadedModel:
    """The model at `weights` on `device` ('auto': the best available), cast to `dtype` (None
    keeps the stored dtype), with the tokenizer `tokenizer` names or the one stored with it,
    and the chat template to prompt it with (see `resolve_chat_template`)."""
    from gptrain.checkpoint.export import load_model_from_commit
    from gptrain.device import resolve_device, resolve_dtype
    from gptrain.models.weights import load_pretrained
    from gptrain.tokenizer import tokenizer_for_model

    source = resolve_weights(weights, verify)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if source.commit is not None:
        model = load_model_from_commit(source.commit, torch_device, torch_dtype)
    else:
        model = load_pretrained(source.path, device=torch_device, dtype=torch_dtype)
    # A run's checkpoint folder holds the tokenizer spec the run trained with.
    model_tokenizer = tokenizer_for_model(source.path, model.config.family, override=tokenizer)
    template = resolve_chat_template(chat_template, source, model_tokenizer)
    return LoadedModel(model=model, tokenizer=model_tokenizer, source=source, device=torch_device,
                       chat_template=template)


def resolve_chat_template(requested: str, source: WeightsSource, tokenizer: Tokenizer) -> str | None:
    """"llama3" or None for `requested` ("auto", "llama3", "none"); "auto" picks llama3 for
    instruct weights with a Llama 3 tokenizer (a gptrain checkpoint is pretrained: never)."""
    if requested not in CHAT_TEMPLATES:
        raise GptrainError(f"chat template {requested!r}: must be one of {', '.join(CHAT_TEMPLATES)}")
    has_headers = "<|start_header_id|>" in tokenizer.special_tokens
    if requested == "llama3" and not has_headers:
        raise GptrainError(f"--chat-template llama3: the tokenizer of {source.path} ({tokenizer.name}) "
                           "has no Llama 3 header tokens")
    if requested == "auto":
        is_instruct = source.commit is None and has_headers and _is_instruct(source.path, tokenizer)
        return "llama3" if is_instruct else None
    return None if requested == "none" else requested


def check_system_prompt(loaded: LoadedModel, system_prompt: str | None) -> None:
    if system_prompt is not None and loaded.chat_template is None:
        raise GptrainError(f"--system-prompt needs a chat template: {loaded.source.path} is prompted as a base "
                           "model (pass --chat-template llama3 for Llama 3 instruct weights)")


def _is_instruct(path: str, tokenizer: Tokenizer) -> bool:
    folder = path if storage.is_dir(path) else posixpath.dirname(path)
    if "instruct" in posixpath.basename(folder.rstrip("/")).lower():
        return True
    end_of_turn = tokenizer.special_tokens["<|eot_id|>"]
    for name in INSTRUCT_CONFIG_FILES:
        file = storage.join(folder, name)
        if storage.exists(file):
            try:
                eos = storage.read_json(file).get("eos_token_id")
            except ValueError as err:  # not JSON
                raise GptrainError(str(err)) from err
            if end_of_turn in (eos if isinstance(eos, list) else [eos]):
                return True
    return False
