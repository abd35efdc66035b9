"""Model architecture configs: the GPT-2 family, the Llama family and tiny test models.

One `ModelConfig` describes both families; `family` selects the components (LayerNorm +
GELU MLP + learned positions for GPT-2; RMSNorm + SwiGLU + RoPE for Llama). Sizes are the
published ones, so parameter counts on the meta device match the papers/model cards.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from gptrain.errors import GptrainError

VOCAB_PAD_MULTIPLE = 64  # embedding/head rows are padded so matmuls hit fast tile sizes (50,257 -> 50,304)


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 style RoPE frequency scaling (long-context extension)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context_length: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    family: Literal["gpt2", "llama"]
    vocab_size: int
    context_length: int
    n_layers: int
    n_heads: int
    d_model: int
    d_ff: int
    n_kv_heads: int | None = None  # None: multi-head attention (n_kv_heads == n_heads)
    dropout: float = 0.0
    qkv_bias: bool = False
    bias: bool = False  # biases on the output projections, MLP and norms (GPT-2)
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    init_std: float = 0.02
    # Implementation switches: every setting computes the same function from the same weights
    # (and checkpoints), only faster or slower; `gptrain bench` turns them on one at a time.
    # attention: "sdpa" is scaled_dot_product_attention with an implicit causal mask; "masked"
    # the textbook softmax(QK^T/sqrt(d) + mask) V with a stored context x context causal mask.
    attention: Literal["sdpa", "masked"] = "sdpa"
    # Q, K and V in one matmul (True) or three, over the rows of the same `qkv` weight.
    fused_qkv: bool = True
    vocab_pad_multiple: int = VOCAB_PAD_MULTIPLE  # 1: no padding rows
    # Dropout masks: "hash" derives them from a counter hash in compiled CPU graphs (aten's
    # elsewhere; models/dropout.py says why), "aten" always draws them from aten's generator.
    # The same drop probability either way, different draws.
    dropout_masks: Literal["hash", "aten"] = "hash"

    def __post_init__(self) -> None:
        if self.family not in ("gpt2", "llama"):
            raise GptrainError(f"model.family must be 'gpt2' or 'llama', got {self.family!r}")
        for name in ("vocab_size", "context_length", "n_layers", "n_heads", "d_model", "d_ff"):
            if getattr(self, name) <= 0:
                raise GptrainError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise GptrainError(f"model.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise GptrainError(f"model.n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise GptrainError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.attention not in ("sdpa", "masked"):
            raise GptrainError(f"model.attention must be 'sdpa' or 'masked', got {self.attention!r}")
        if self.dropout_masks not in ("hash", "aten"):
            raise GptrainError(f"model.dropout_masks must be 'hash' or 'aten', got {self.dropout_masks!r}")
        if self.vocab_pad_multiple < 1:
            raise GptrainError(f"model.vocab_pad_multiple must be >= 1, got {self.vocab_pad_multiple}")
        if self.family == "llama" and self.head_dim % 2:
            raise GptrainError(f"RoPE needs an even head dimension, got {self.head_dim}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_pad_multiple) * self.vocab_pad_multiple

    def num_parameters(self, include_padding: bool = False) -> int:
        """Unique parameters, from the shapes alone (tied embeddings counted once)."""
        vocab = self.padded_vocab_size if include_padding else self.vocab_size
        d, hd = self.d_model, self.head_dim
        qkv = d * (self.n_heads + 2 * self.kv_heads) * hd + (self.n_heads + 2 * self.kv_heads) * hd * self.qkv_bias
        attn_out = self.n_heads * hd * d + d * self.bias
        if self.family == "gpt2":
            mlp = d * self.d_ff + self.d_ff + self.d_ff * d + d  # fc and proj with biases
            norms = 2 * 2 * d  # two LayerNorms with bias per block
            final_norm = 2 * d
            positions = self.context_length * d
        else:
            mlp = 3 * d * self.d_ff
            norms = 2 * d
            final_norm = d
            positions = 0
        per_block = qkv + attn_out + mlp + norms
        embeddings = vocab * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_block + final_norm + positions + embeddings

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N for the matmuls plus 12·L·d·T for attention
        (PaLM paper, appendix B), with N excluding the embedding lookup."""
        seq_len = seq_len or self.context_length
        n = self.num_parameters() - self.vocab_size * self.d_model * (0 if self.tie_embeddings else 1)
        if self.family == "gpt2":
            n -= self.context_length * self.d_model
        return 6.0 * n + 12.0 * self.n_layers * self.d_model * seq_len

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _gpt2(n_layers: int, n_heads: int, d_model: int, **kw) -> ModelConfig:
    base = dict(
        family="gpt2", vocab_size=50257, context_length=1024, n_layers=n_layers, n_heads=n_heads,
        d_model=d_model, d_ff=4 * d_model, qkv_bias=True, bias=True, tie_embeddings=True, dropout=0.0,
    )
    return ModelConfig(**{**base, **kw})


def _llama(**kw) -> ModelConfig:
    return ModelConfig(family="llama", **kw)


_LLAMA3_8B = dict(
    vocab_size=128256, context_length=8192, n_layers=32, n_heads=32, n_kv_heads=8, d_model=4096,
    d_ff=14336, rope_theta=500000.0,
)
_LLAMA32 = dict(
    vocab_size=128256, context_length=131072, n_kv_heads=8, rope_theta=500000.0, tie_embeddings=True,
    rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_context_length=8192),
)

MODEL_CONFIGS: dict[str, ModelConfig] = {
    "gpt2-124m": _gpt2(12, 12, 768),
    "gpt2-355m": _gpt2(24, 16, 1024),
    "gpt2-774m": _gpt2(36, 20, 1280),
    "gpt2-1558m": _gpt2(48, 25, 1600),
    # Test/debug sizes: the real GPT-2 vocabulary so they work with the real tokenizer.
    "gpt2-tiny": _gpt2(2, 4, 64, context_length=256),
    "gpt2-small-test": _gpt2(4, 4, 128, context_length=256),
    "llama2-7b": _llama(
        vocab_size=32000, context_length=4096, n_layers=32, n_heads=32, d_model=4096, d_ff=11008,
    ),
    "llama3-8b": _llama(**_LLAMA3_8B),
    "llama3.1-8b": _llama(**{**_LLAMA3_8B, "context_length": 131072}, rope_scaling=RopeScaling()),
    "llama3.2-1b": _llama(n_layers=16, n_heads=32, d_model=2048, d_ff=8192, **_LLAMA32),
    "llama3.2-3b": _llama(n_layers=28, n_heads=24, d_model=3072, d_ff=8192, **_LLAMA32),
    "llama-tiny": _llama(
        vocab_size=50257, context_length=256, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, d_ff=192,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_context_length=64),
    ),
}


def get_model_config(name: str, **overrides) -> ModelConfig:
    """A preset by name, with fields replaced by `overrides` (None values are ignored)."""
    if name not in MODEL_CONFIGS:
        raise GptrainError(f"unknown model {name!r}; known models: {', '.join(MODEL_CONFIGS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise GptrainError(f"unknown model config keys {unknown}; valid keys: {sorted(known)}")
    return dataclasses.replace(MODEL_CONFIGS[name], **overrides)
