"""The bf16 copy (gptrain/train/bf16_copy.py): whatever shortcuts it takes on a CPU (the token
rows' gradients added by index, no padding rows), the fp32 master gradients it accumulates are
the gradients autograd gives a plain bf16 copy of the model, eager and compiled, tied (GPT-2)
and untied (Llama), over several micro-batches; the padding rows get none."""

from __future__ import annotations

import copy

import pytest
import torch

from gptrain.models import ModelConfig, Transformer
from gptrain.train.bf16_copy import Bf16Copy, TokenRows
from gptrain.train.parallelize import token_cross_entropy

VOCAB = 1000  # padded to 1024 rows: the copy must drop 24
MODELS = {
    "gpt2-tied": ModelConfig(family="gpt2", vocab_size=VOCAB, context_length=32, n_layers=2, n_heads=2, d_model=64,
                             d_ff=256, bias=True, tie_embeddings=True),
    "llama-untied": ModelConfig(family="llama", vocab_size=VOCAB, context_length=32, n_layers=2, n_heads=4,
                                n_kv_heads=2, d_model=64, d_ff=128),
}


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    # Few distinct tokens, so that rows repeat within a batch and their gradients must add up.
    tokens = [torch.randint(0, 50, (2, 33), generator=generator) for _ in range(count)]
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def compiled_if(compiled: bool, module: torch.nn.Module):
    return torch.compile(module, options={"fallback_random": True}) if compiled else module  # as gptrain on CPU


def plain_bf16_gradients(model: Transformer, data, compiled: bool) -> dict[str, torch.Tensor]:
    """The reference: autograd over a bf16 copy with every row, gradients summed in fp32."""
    reference = copy.deepcopy(model).to(torch.bfloat16)
    forward = compiled_if(compiled, reference)
    total = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in model.named_parameters()}
    for x, y in data:
        token_cross_entropy(forward(x), y).backward()
        for name, p in reference.named_parameters():
            total[name] += p.grad.float()
            p.grad = None
    return total


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", list(MODELS))
def test_master_gradients_are_autograds_and_the_padding_rows_get_none(name, compiled):
    torch.manual_seed(0)
    model = Transformer(MODELS[name])
    assert model.tok_emb.num_embeddings == 1024
    data = batches(3)
    expected = plain_bf16_gradients(model, data, compiled)

    bf16 = Bf16Copy(model)
    assert isinstance(bf16.module.tok_emb, TokenRows)
    assert bf16.module.tok_emb.weight.shape[0] == VOCAB and bf16.module.lm_head.weight.shape[0] == VOCAB
    assert (bf16.module.lm_head.weight is bf16.module.tok_emb.weight) == model.config.tie_embeddings
    forward = compiled_if(compiled, bf16.module)
    for x, y in data:  # three micro-batches of one optimizer step
        token_cross_entropy(forward(x), y).backward()
        bf16.accumulate_gradients()
    assert not bf16.module.tok_emb.lookups

    for param_name, master in model.named_parameters():
        assert master.grad is not None and master.grad.dtype == torch.float32, param_name
        want = expected[param_name]
        # One bf16 rounding apart at most: the copy adds the token rows in fp32, where autograd
        # summed the dense embedding gradient and rounded it to bf16.
        scale = want.abs().max().item()
        torch.testing.assert_close(master.grad, want, rtol=0, atol=scale * 2**-7, msg=param_name)
        if master.shape[0] == 1024:
            assert torch.count_nonzero(master.grad[VOCAB:]) == 0, param_name
    # The token embedding's gradient is its rows' exactly where the tokens are: rows of tokens
    # the batches never held get nothing from the lookups (tied: the head's gradient only).
    if not model.config.tie_embeddings:
        assert torch.count_nonzero(model.tok_emb.weight.grad[50:]) == 0

    # After the optimizer step the copy computes with the new weights, padding rows left out.
    with torch.no_grad():
        for master in model.parameters():
            master.add_(1.0)
    bf16.refresh()
    for master, compute in bf16.pairs:
        assert torch.equal(compute, master[: len(compute)].to(torch.bfloat16))
