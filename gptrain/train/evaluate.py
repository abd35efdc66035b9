"""Evaluation during training: validation loss over a fixed set of windows, and a text sample.

The validation windows are the same at every evaluation (evenly spaced over the split, see
`gptrain.data.loader.eval_batches`), so successive losses are comparable, and split across
ranks, whose sums are added up: the loss does not depend on the number of ranks.
"""

from __future__ import annotations

import contextlib

import torch

from gptrain.config import EvalConfig
from gptrain.data.loader import TokenDataset, eval_batches
from gptrain.distributed import DistEnv, all_reduce_sum
from gptrain.models.generation import SamplingConfig, generate
from gptrain.models.transformer import Transformer
from gptrain.train.parallelize import token_cross_entropy


@torch.no_grad()
def validation_loss(
    model: Transformer,
    dataset: TokenDataset,
    batch_size: int,
    max_windows: int,
    env: DistEnv,
    autocast: contextlib.AbstractContextManager,
) -> float:
    """Mean cross-entropy per token over the first `max_windows` validation windows, all ranks."""
    device = model.tok_emb.weight.device
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (summed loss, tokens)
    context_length = model.config.context_length
    for x, y in eval_batches(dataset, context_length, batch_size, max_windows, "val", env.rank, env.world_size):
        x, y = x.to(device), y.to(device)
        with autocast:
            logits = model(x)
        totals[0] += token_cross_entropy(logits, y, reduction="sum")
        totals[1] += y.numel()
    all_reduce_sum(totals)
    model.train(was_training)
    return (totals[0] / totals[1]).item()


def sample_text(model: Transformer, tokenizer, eval_config: EvalConfig, seed: int, fixed_length: bool = False) -> str:
    """eval.sample_prompt and its continuation, generated in full precision with the
    configured temperature and top-k (its own seeded generator: the training RNG streams are
    left alone); ends at `<|endoftext|>`.

    `fixed_length`: generate all eval.sample_max_new_tokens and cut at the first
    `<|endoftext|>` afterwards, so that ranks running the forwards together (FSDP) make the
    same number of them even if their numbers were ever to differ in the last bit."""
    was_training = model.training
    model.eval()
    config = SamplingConfig(
        max_new_tokens=eval_config.sample_max_new_tokens, temperature=eval_config.sample_temperature,
        top_k=eval_config.sample_top_k, seed=seed, stop_ids=() if fixed_length else (tokenizer.eot_id,),
    )
    prompt_ids = tokenizer.encode(eval_config.sample_prompt)
    (new_ids,) = generate(model, [prompt_ids], config)
    if tokenizer.eot_id in new_ids:
        new_ids = new_ids[: new_ids.index(tokenizer.eot_id)]
    model.train(was_training)
    return tokenizer.decode(prompt_ids + new_ids)
