"""The output head on a CPU: logits = hidden @ weight^T, its matmuls taken in blocks.

The head's products have one long dimension, the vocabulary (50,257 rows for GPT-2), and on two
cores oneDNN computes two of them well below the speed it reaches on the model's other matmuls:
- the logits, (tokens x d_model) @ (d_model x vocab): in blocks of 256 tokens, each written into
  its rows of the logits, GPT-2 124M's head took 46 ms instead of 60 at 512 tokens (bf16), and
  94 ms instead of 124 at 1,024;
- the weight gradient, grad_logits^T @ hidden, (vocab x tokens) @ (tokens x d_model): in blocks
  of 4,096 vocabulary rows, 47 ms instead of 83 at 512 tokens, 94 instead of 150 at 1,024, and
  396 instead of 560 at 4,096 (fp32 gains 0-17%).
The gradient of the hidden states, grad_logits @ weight, gains nothing from blocks and is left
whole. No block splits the inner dimension, so every element is the same dot product as in one
matmul: the results are bit-identical.

`project_to_vocabulary` is the head's forward and backward with these products. They are custom
ops (`gptrain::vocab_logits`, `gptrain::vocab_weight_grad`), so torch.compile calls them as they
are rather than tracing their loops of matmuls into slices and concatenations.
"""

from __future__ import annotations

import torch

TOKENS_PER_BLOCK = 256
ROWS_PER_BLOCK = 4096


@torch.library.custom_op("gptrain::vocab_logits", mutates_args=())
def vocab_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden @ weight^T for hidden (tokens, d_model) and weight (vocab, d_model): the
    (tokens, vocab) logits, TOKENS_PER_BLOCK tokens at a time."""
    out = hidden.new_empty((hidden.shape[0], weight.shape[0]))
    for start in range(0, hidden.shape[0], TOKENS_PER_BLOCK):
        block = slice(start, start + TOKENS_PER_BLOCK)
        torch.mm(hidden[block], weight.t(), out=out[block])
    return out


@vocab_logits.register_fake
def _(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return hidden.new_empty((hidden.shape[0], weight.shape[0]))


@torch.library.custom_op("gptrain::vocab_weight_grad", mutates_args=())
def vocab_weight_grad(grad_logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """grad_logits^T @ hidden for grad_logits (tokens, vocab) and hidden (tokens, d_model):
    the (vocab, d_model) weight gradient, ROWS_PER_BLOCK vocabulary rows at a time."""
    out = hidden.new_empty((grad_logits.shape[1], hidden.shape[1]))
    for start in range(0, grad_logits.shape[1], ROWS_PER_BLOCK):
        block = slice(start, start + ROWS_PER_BLOCK)
        torch.mm(grad_logits[:, block].t(), hidden, out=out[block])
    return out


@vocab_weight_grad.register_fake
def _(grad_logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    return hidden.new_empty((grad_logits.shape[1], hidden.shape[1]))


class _VocabProjection(torch.autograd.Function):
    @staticmethod
    def forward(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return vocab_logits(hidden.flatten(0, -2), weight).unflatten(0, hidden.shape[:-1])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad_logits: torch.Tensor):
        hidden, weight = ctx.saved_tensors
        grad_hidden = grad_logits @ weight if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = vocab_weight_grad(grad_logits.flatten(0, -2), hidden.flatten(0, -2))
        return grad_hidden, grad_weight


def project_to_vocabulary(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(hidden, weight) for the output head on a CPU (hidden: (..., d_model), weight:
    (vocab, d_model)), its logits and weight gradient computed in blocks."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        # Autocast casts only the ops on its lists, not custom ops: cast the operands as it
        # casts F.linear's (the gradients flow back through the casts to the fp32 weights).
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    return _VocabProjection.apply(hidden, weight)
