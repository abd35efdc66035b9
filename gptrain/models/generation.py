"""Text generation for both families: batched, with a KV cache, streaming one step at a time.

Prompts of different lengths are left-padded to a common length; each row gets its own
positions (counting from its first real token) and a boolean attention mask that hides the
padding, so a padded row generates exactly what it would generate alone. A row stops at
its first stop token; generation ends when every row has stopped or the budget is spent.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from gptrain.errors import GptrainError
from gptrain.models.sampling import SamplingConfig
from gptrain.models.transformer import Transformer

__all__ = ["SamplingConfig", "generate", "generate_stream", "sample_next_token"]


def sample_next_token(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from logits (batch, vocab)."""
    if config.temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / config.temperature
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if config.top_p is not None and config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= config.top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_stream(model: Transformer, prompts: list[list[int]], config: SamplingConfig) -> Iterator[list[int | None]]:
    """Yield, at each step, one new token per row (None for rows that have stopped)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GptrainError("every prompt needs at least one token")
    device = model.tok_emb.weight.device
    context = model.config.context_length
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise GptrainError(f"prompt of {longest} tokens leaves no room in the context of {context} tokens")
    max_new = min(config.max_new_tokens, context - longest)
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)

    batch = len(prompts)
    tokens = torch.zeros(batch, longest, dtype=torch.long, device=device)
    is_real = torch.zeros(batch, longest, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt):] = torch.tensor(prompt, device=device)
        is_real[row, longest - len(prompt):] = True
    caches = model.new_kv_caches(batch, longest + max_new) if config.use_cache else None
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)
    stop_ids = torch.tensor(config.stop_ids, dtype=torch.long, device=device)

    step_input = tokens
    for _ in range(max_new):
        logits = model(step_input, *_positions_and_mask(is_real, new=step_input.shape[1]), kv_caches=caches)
        next_token = sample_next_token(logits[:, -1], config, generator)
        stopped |= torch.isin(next_token, stop_ids)
        row_stopped = stopped.tolist()
        yield [None if done else int(t) for t, done in zip(next_token.tolist(), row_stopped)]
        if all(row_stopped):
            return
        is_real = torch.cat((is_real, torch.ones(batch, 1, dtype=torch.bool, device=device)), dim=1)
        if caches is not None:
            step_input = next_token[:, None]  # the cache holds the keys and values of all before it
        else:
            tokens = step_input = torch.cat((tokens, next_token[:, None]), dim=1)


def _positions_and_mask(is_real: torch.Tensor, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the last `new` tokens and their attention mask over all keys so far.

    A query sees keys at or before it that are real tokens. Padding queries also see
    themselves, so no row of the mask is empty (an empty row would give NaN).
    """
    total = is_real.shape[1]
    positions = (is_real.long().cumsum(dim=1) - 1).clamp(min=0)[:, total - new:]
    query_index = torch.arange(total - new, total, device=is_real.device)[:, None]
    key_index = torch.arange(total, device=is_real.device)[None, :]
    mask = (key_index <= query_index)[None] & is_real[:, None, :]
    mask |= (key_index == query_index)[None]
    return positions, mask[:, None]


def generate(model: Transformer, prompts: list[list[int]], config: SamplingConfig) -> list[list[int]]:
    """New tokens for each prompt, excluding the stop token."""
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in generate_stream(model, prompts, config):
        for row, token in enumerate(step):
            if token is not None:
                outputs[row].append(token)
    return outputs
