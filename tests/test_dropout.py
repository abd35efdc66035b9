"""Dropout masks from the counter hash (gptrain/models/dropout.py): compiled CPU graphs draw two
keys from the global generator per dropout call and hash each element's index with them.

What must hold for that to stand in for aten's Bernoulli draws: the drop rate is p and the
masks are independent of each other (neighbouring elements, other keys); the compiled kernels
compute the very mask the eager definition does; backward reuses the forward's mask; the global
generator's state decides the keys (so checkpointed RNG states and activation checkpointing's
replay reproduce them); eager mode keeps aten's dropout exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from gptrain.models import Transformer, get_model_config
from gptrain.models.dropout import dropout, hash_keep_mask
from gptrain.train.parallelize import apply_activation_checkpointing

N = 1 << 20


def compiled(fn):
    return torch.compile(fn, options={"fallback_random": True})  # as gptrain compiles for CPU


def keys(first: int, second: int) -> torch.Tensor:
    return torch.tensor([first, second], dtype=torch.int32)


def within_5_sigma(frequency: float, p: float, n: int) -> bool:
    return abs(frequency - p) < 5 * (p * (1 - p) / n) ** 0.5


@pytest.mark.parametrize("p", [0.02, 0.1, 0.5, 0.9])
def test_hash_masks_drop_p_of_the_elements_independently(p):
    dropped = (~hash_keep_mask(torch.Size([N]), p, keys(123, -456))).double()
    assert within_5_sigma(dropped.mean().item(), p, N)
    # Neighbours (and elements 1,000 apart) drop independently: both with probability p².
    for gap in (1, 1000):
        assert within_5_sigma((dropped[gap:] * dropped[:-gap]).mean().item(), p * p, N - gap)
    # Keys one apart, in either word, give masks independent of this one.
    for other in (keys(124, -456), keys(123, -455)):
        other_dropped = (~hash_keep_mask(torch.Size([N]), p, other)).double()
        assert within_5_sigma(other_dropped.mean().item(), p, N)
        assert within_5_sigma((dropped * other_dropped).mean().item(), p * p, N)


def test_compiled_kernels_compute_the_eager_mask():
    shape = torch.Size([2, 3, 64, 64])
    for pair in (keys(0, 0), keys(-(2**31), 2**31 - 1), keys(987654321, -123456789)):
        assert torch.equal(compiled(hash_keep_mask)(shape, 0.1, pair), hash_keep_mask(shape, 0.1, pair))


def test_compiled_dropout_takes_its_keys_from_the_global_generator_and_backward_reuses_the_mask():
    p = 0.25
    drop = compiled(lambda x: dropout(x, p, training=True))
    x = torch.randn(4, 4096, requires_grad=True)
    torch.manual_seed(7)
    y = drop(x)
    torch.manual_seed(7)
    assert torch.equal(drop(x), y)  # the same generator state: the same mask (resume relies on it)
    assert not torch.equal(drop(x) != 0, y != 0)  # the generator moved on: new keys, a new mask
    kept = y != 0
    assert within_5_sigma(1 - kept.double().mean().item(), p, x.numel())
    assert torch.equal(y[kept], x[kept] * (1 / (1 - p)))
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, kept.float() / (1 - p))  # backward recomputed the forward's mask
    torch.manual_seed(7)
    assert not torch.equal(F.dropout(x, p) != 0, kept)  # compiled, the mask was not aten's


def test_eager_dropout_and_aten_masks_stay_aten_dropout():
    x = torch.randn(8, 512)
    torch.manual_seed(3)
    expected = F.dropout(x, 0.1)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.1, training=True), expected)  # eager: aten's kernel
    torch.manual_seed(3)
    assert torch.equal(compiled(lambda x: dropout(x, 0.1, True, masks="aten"))(x), expected)
    assert torch.equal(dropout(x, 0.1, training=False), x)


@pytest.mark.slow
def test_compiled_model_with_hash_masks_is_causal_and_checkpointing_replays_its_masks():
    """A compiled GPT-2 with dropout: the attention runs its explicit causal path with hash masks
    (causal: later tokens do not change earlier logits under the same masks); a block under
    activation checkpointing recomputes the same masks, so the gradients equal the
    uncheckpointed model's."""
    config = get_model_config("gpt2-tiny", dropout=0.2, context_length=16, n_layers=1)
    torch.manual_seed(0)
    model = Transformer(config)
    checkpointed = copy.deepcopy(model)
    apply_activation_checkpointing(checkpointed, "full")
    idx = torch.randint(0, config.vocab_size, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % config.vocab_size
    forward = compiled(model)
    torch.manual_seed(5)
    logits = forward(idx)
    torch.manual_seed(5)
    torch.testing.assert_close(forward(changed)[:, :10], logits[:, :10])

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), idx.roll(-1, 1).flatten())

    loss(logits).backward()
    torch.manual_seed(5)
    loss(compiled(checkpointed)(idx)).backward()
    gradients = [{name.replace("._checkpoint_wrapped_module", ""): p.grad for name, p in m.named_parameters()}
                 for m in (model, checkpointed)]
    assert gradients[0].keys() == gradients[1].keys()
    for name, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
