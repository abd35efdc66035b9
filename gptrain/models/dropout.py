"""Dropout with masks from a counter-based hash when the model is compiled for CPU.

aten's CPU dropout draws every mask element from the global generator (`bernoulli_`, about
5 ns an element on two cores): for GPT-2 124M at context 256 and batch 2 that is 29M draws and
0.14 s of a 1.2 s training step, and at context 1024 nearly 0.6 s. Inductor's own CPU
generator, element by element, is slower still. Instead, in a compiled CPU graph, each
dropout call draws two 32-bit keys from the global generator and derives the mask from
hash(element index, keys): integer multiplies, shifts and xors that Inductor vectorizes and
fuses into the kernels around them. Over one attention-weights tensor of that model
(2 x 12 x 256 x 256, bf16) dropout took 1.0-1.4 ms forward and backward, aten's 11.5 ms.

The mask is a pure function of the keys: backward recomputes it from them (`dropout` says how
it sees to that) instead of keeping a mask of the tensor's size. Because the keys come from the
global generator, checkpointed RNG states still reproduce every mask on resume, ranks seeded
apart still drop differently, and activation checkpointing's replayed RNG state replays the keys.

The hash is the "lowbias32" integer finalizer (Chris Wellons, hash-prospector), applied
twice: to a Weyl sequence of the element index plus the first key, then to that xor the
second key. Its low 24 bits against round(p·2^24) decide each element: drop probability p
to within 6e-8. Everywhere else (eager mode, CUDA, whose Philox dropout is already fused,
and tensors of 2^31 elements or more, past the int32 index) the aten kernels run unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

_INT32 = torch.iinfo(torch.int32)
_GOLDEN = -1640531527  # 0x9E3779B9 (2^32 / golden ratio, odd) as a signed int32
_MUL1, _MUL2 = 0x7FEB352D, 0x846CA68B - (1 << 32)  # lowbias32's multipliers as signed int32


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int32 (torch's `>>` is arithmetic: mask off the sign copies)."""
    return (x >> bits) & ((1 << (32 - bits)) - 1)


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ _shift_right(x, 16)) * _MUL1
    x = (x ^ _shift_right(x, 15)) * _MUL2
    return x ^ _shift_right(x, 16)


def uses_hash_masks(x: torch.Tensor, masks: str) -> bool:
    """Whether dropout on `x` takes its mask from the hash: asked for ("hash"), compiled, CPU,
    int32-indexable."""
    return (
        masks == "hash" and x.device.type == "cpu" and torch.compiler.is_compiling() and x.numel() < _INT32.max
    )


def hash_keep_mask(shape: torch.Size, p: float, keys: torch.Tensor) -> torch.Tensor:
    """True where an element is kept: hash(index, keys) at or above round(p·2^24)."""
    index = torch.arange(math.prod(shape), dtype=torch.int32, device=keys.device).view(shape)
    bits = _lowbias32(_lowbias32(index * _GOLDEN + keys[0]) ^ keys[1])
    return (bits & 0xFFFFFF) >= round(p * (1 << 24))


def dropout(x: torch.Tensor, p: float, training: bool, masks: str = "hash") -> torch.Tensor:
    """`F.dropout(x, p, training)`, with the mask from the counter hash where that applies."""
    if not training or p == 0.0 or not uses_hash_masks(x, masks):
        return F.dropout(x, p, training)
    keys = torch.randint(_INT32.min, _INT32.max, (2,), dtype=torch.int32, device=x.device)
    # Under checkpoint, the compiled graph marks the hash "recompute": backward derives the mask
    # again from the two keys. Left to itself the partitioner would store a bool mask of x's
    # size (its recompute allowlist lacks bitwise and/xor), and writing it cost more than the hash.
    keep = checkpoint(hash_keep_mask, x.shape, p, keys, use_reentrant=False)
    return torch.where(keep, x * (1.0 / (1.0 - p)), 0.0)


class Dropout(nn.Dropout):
    """`nn.Dropout` (no state) through `dropout` above, with masks "hash" or "aten"."""

    def __init__(self, p: float, masks: str):
        super().__init__(p)
        self.masks = masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training, self.masks)
