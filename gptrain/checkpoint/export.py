"""`gptrain export RUN_OR_CHECKPOINT --out DIR`: a checkpoint's weights in the Hugging Face layout.

    gptrain export runs/debug --out exported/debug            # the run's newest committed checkpoint
    gptrain export s3://bucket/runs/a/checkpoints/step-4000 --out exported/a-4000

The folder gets model.safetensors (or shards) and config.json in the layout of the model's
family (gptrain.models.weights.save_hf_pretrained), so `transformers` and
`gptrain generate --weights DIR` load it, plus the tokenizer spec the run trained with.

The checkpoint's files are checked against its commit marker first, sizes and sha256s: a
damaged checkpoint is refused by name (for a run directory, the newest intact one is used,
with a warning). --no-verify skips the checksums (sizes are still checked), which saves
reading every byte twice.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from gptrain import storage
from gptrain.checkpoint import commit as commits
from gptrain.checkpoint.commit import CheckpointError
from gptrain.cli import add_documented_command
from gptrain.tokenizer import TOKENIZER_SPEC_FILE

if TYPE_CHECKING:
    import torch

    from gptrain.models.transformer import Transformer

log = logging.getLogger("gptrain.checkpoint")


def is_gptrain_checkpoint(url: str) -> bool:
    """A gptrain run directory (with checkpoints/) or one checkpoint folder (with a marker)."""
    return storage.exists(commits.checkpoints_url(url)) or storage.exists(storage.join(url, commits.MARKER_FILE))


def usable_checkpoint(url: str, verify: bool = True) -> commits.Commit:
    """The checkpoint folder `url` names, or a run directory's newest committed checkpoint whose
    files are intact (an older one, with a warning, when the newest is damaged); `verify`
    False checks the files' sizes, not their sha256s."""
    problems = []
    for candidate in commits.candidates(url):
        try:
            commit = commits.read_commit(candidate)
            commits.verify(commit, checksums=verify)
            return commit
        except CheckpointError as err:
            problems.append(str(err))
            log.warning("skipping %s: %s", candidate, err)
    if not problems:
        raise CheckpointError(f"{url}: the run has no committed checkpoint")
    raise CheckpointError(f"{url}: no usable checkpoint:\n  " + "\n  ".join(problems))


def load_model_from_checkpoint(
    url: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, verify: bool = True
) -> Transformer:
    """The model of a gptrain checkpoint (or a run's newest), in eval mode."""
    return load_model_from_commit(usable_checkpoint(url, verify), device, dtype)


def load_model_from_commit(
    commit: commits.Commit, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Transformer:
    """The model of a checkpoint `usable_checkpoint` has found and verified, in eval mode."""
    import torch

    from gptrain.checkpoint.store import read_model_weights, read_run_config
    from gptrain.models.transformer import Transformer

    model_config = read_run_config(commit.url).model.resolve()
    with torch.device("meta"):  # no time spent on a random initialization that is overwritten
        model = Transformer(model_config)
    model.to_empty(device=device)
    if model_config.tie_embeddings:
        # to_empty gave the head a Parameter of its own: tie it again (one copy in memory, as trained).
        model.lm_head.weight = model.tok_emb.weight
    model.init_buffers()
    read_model_weights(commit.url, model)
    if dtype is not None:
        model.to(dtype)
    log.info("loaded %s (step %d)", commit.url, commit.step)
    return model.eval()


def export(url: str, out_dir: str, verify: bool = True) -> commits.Commit:
    from gptrain.models.weights import save_hf_pretrained

    commit = usable_checkpoint(url, verify)
    model = load_model_from_commit(commit)
    save_hf_pretrained(model, out_dir)
    spec = storage.join(commit.url, TOKENIZER_SPEC_FILE)
    if storage.exists(spec):
        storage.write_bytes_atomic(storage.join(out_dir, TOKENIZER_SPEC_FILE), storage.read_bytes(spec))
    return commit


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_documented_command(
        subparsers,
        "export",
        "write a checkpoint's weights as safetensors + config.json (Hugging Face layout)",
        __doc__,
    )
    parser.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                        help="a run directory (its newest committed checkpoint) or a checkpoint folder; path or URL")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder or URL (must not hold a model yet)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the sha256 check of the checkpoint's files (their sizes are still checked)")
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    commit = export(args.source, args.out, args.verify)
    print(f"exported {commit.url} (step {commit.step}) to {args.out}")
    return 0
