"""The decoder-only transformer for both families, top to bottom.

GPT-2: learned positions, pre-LayerNorm blocks, tanh-GELU MLP, biases, tied embeddings.
Llama: RoPE, pre-RMSNorm blocks, SwiGLU MLP, grouped-query attention, no biases.
Attention goes through `scaled_dot_product_attention` (flash/memory-efficient kernels on
GPU); training uses `is_causal=True` so no mask is stored or built. Q, K and V come from one
fused projection and SwiGLU's gate and up projections from one, so each is a single matmul.
Compiled for CPU with dropout, attention is spelled out instead (CPU SDPA computes the same math
when it drops) so that its dropout masks come from the counter hash of models/dropout.py.
`ModelConfig.attention="masked"` and `fused_qkv=False` switch to the textbook implementations
(a stored causal mask and softmax; three Q/K/V matmuls over the rows of the same weight) for
`gptrain bench`'s ladder: the same function and the same checkpoints, only slower.

The embedding and output head are padded to a multiple of 64 rows; `forward` returns logits
for the real vocabulary only, so padding rows are never sampled and never in the loss (on
CPU they are not even computed: there, aligned tiles gain less than slicing costs).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from gptrain.models.config import ModelConfig
from gptrain.models.dropout import Dropout, dropout, uses_hash_masks
from gptrain.models.head import project_to_vocabulary


class KVCache:
    """Keys and values of one layer for incremental decoding, preallocated to `max_len`."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, device, dtype):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + keys.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache holds {self.keys.shape[2]} positions, asked for {end}")
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies, with Llama 3.1 scaling when configured: wavelengths longer
    than original_context/low_freq_factor are divided by `factor`, shorter than
    original_context/high_freq_factor kept, and the band in between interpolated smoothly."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.float()
    wavelength = 2 * math.pi / inv_freq
    low_freq_wavelength = scaling.original_context_length / scaling.low_freq_factor
    high_freq_wavelength = scaling.original_context_length / scaling.high_freq_factor
    smooth = (scaling.original_context_length / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelength > low_freq_wavelength, inv_freq / scaling.factor, interpolated)
    scaled = torch.where(wavelength < high_freq_wavelength, inv_freq, scaled)
    return scaled.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + head_dim/2) of x (batch, heads, seq, head_dim) by their angles."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        qkv_out = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv = nn.Linear(config.d_model, qkv_out, bias=config.qkv_bias)
        self.proj = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=config.bias)
        self.dropout, self.dropout_masks = config.dropout, config.dropout_masks
        self.fused_qkv, self.masked = config.fused_qkv, config.attention == "masked"
        if self.masked:
            # True above the diagonal: the future positions a query must not see. Not persistent:
            # derived from the config, never in checkpoints.
            mask = torch.ones(config.context_length, config.context_length, dtype=torch.bool).triu(1)
            self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, x, rope=None, attn_mask=None, kv_cache: KVCache | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        if self.fused_qkv:
            q, k, v = self.qkv(x).split([q_size, kv_size, kv_size], dim=-1)
        else:
            weights = self.qkv.weight.split([q_size, kv_size, kv_size])
            biases = self.qkv.bias.split([q_size, kv_size, kv_size]) if self.qkv.bias is not None else (None,) * 3
            q, k, v = (F.linear(x, w, b) for w, b in zip(weights, biases))
        q = q.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
        p = self.dropout if self.training else 0.0
        if self.masked or (p > 0 and uses_hash_masks(q, self.dropout_masks)):
            # CPU SDPA with dropout runs this math anyway (no fused kernel drops on CPU); spelled
            # out, the attention weights' dropout mask comes from the counter hash when compiled.
            y = self._explicit_attention(q, k, v, attn_mask, p)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=attn_mask is None,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )
        return self.proj(y.transpose(1, 2).reshape(batch, seq, q_size))

    def _explicit_attention(self, q, k, v, attn_mask, p: float) -> torch.Tensor:
        """softmax(QK^T/sqrt(d)) V, causal through the stored mask in `masked` mode (else built
        from the shape, which compiles to an index comparison), or through `attn_mask`
        (True = attend)."""
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        seq, keys = q.shape[2], k.shape[2]
        if attn_mask is not None:
            hidden = ~attn_mask
        elif self.masked:
            hidden = self.causal_mask[:seq, :keys]
        else:
            hidden = torch.ones(seq, keys, dtype=torch.bool, device=q.device).triu(keys - seq + 1)
        weights = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
        return dropout(weights, p, p > 0, self.dropout_masks) @ v


class GeluMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, 2 * config.d_ff, bias=False)  # [gate; up]
        self.proj = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.family == "gpt2":
        return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
    return nn.RMSNorm(config.d_model, eps=config.norm_eps)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = Attention(config)
        self.norm2 = make_norm(config)
        self.mlp = GeluMLP(config) if config.family == "gpt2" else SwiGLU(config)
        self.resid_dropout = Dropout(config.dropout, config.dropout_masks)

    def forward(self, x, rope=None, attn_mask=None, kv_cache=None) -> torch.Tensor:
        x = x + self.resid_dropout(self.attn(self.norm1(x), rope, attn_mask, kv_cache))
        return x + self.resid_dropout(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.context_length, config.d_model) if config.family == "gpt2" else None
        self.emb_dropout = Dropout(config.dropout, config.dropout_masks)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if config.family == "llama":
            # Non-persistent: derived from the config, never stored in checkpoints.
            self.register_buffer("rope_cos", torch.empty(config.context_length, config.head_dim), persistent=False)
            self.register_buffer("rope_sin", torch.empty(config.context_length, config.head_dim), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) weights, zero biases, unit norms, and the
        projections into the residual stream scaled by 1/sqrt(2·n_layers) (GPT-2 paper)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layers))
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """(Re)compute derived buffers; call after materialising a model built on `meta`."""
        for module in self.modules():
            if isinstance(module, Attention) and module.masked and not module.causal_mask.is_meta:
                module.causal_mask.copy_(torch.ones_like(module.causal_mask).triu(1))
        if self.config.family != "llama" or self.rope_cos.is_meta:
            return
        inv_freq = rope_inverse_frequencies(self.config).to(self.rope_cos.device)
        positions = torch.arange(self.config.context_length, device=inv_freq.device, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.rope_cos.copy_(angles.cos())
        self.rope_sin.copy_(angles.sin())

    def forward(
        self,
        idx: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab_size) for token ids `idx` (batch, seq).

        Training calls this with `idx` alone (causal attention over positions 0..seq-1).
        Generation passes per-row positions `input_pos` (batch, seq), a boolean
        `attn_mask` (batch, 1, seq, keys) and one KVCache per layer.
        """
        seq = idx.shape[1]
        if input_pos is None and seq > self.config.context_length:
            raise ValueError(f"sequence of {seq} tokens exceeds context_length {self.config.context_length}")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(input_pos if input_pos is not None else torch.arange(seq, device=idx.device))
        rope = None
        if self.config.family == "llama":
            if input_pos is None:
                rope = (self.rope_cos[:seq], self.rope_sin[:seq])
            else:
                rope = (self.rope_cos[input_pos].unsqueeze(1), self.rope_sin[input_pos].unsqueeze(1))
            rope = (rope[0].to(x.dtype), rope[1].to(x.dtype))
        x = self.emb_dropout(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, attn_mask, kv_caches[i] if kv_caches is not None else None)
        x = self.norm_f(x)
        vocab = self.config.vocab_size
        if x.device.type == "cpu":
            # Only the head's real rows (a contiguous view): slicing padded logits instead would
            # copy them into a contiguous tensor for the loss and, in backward, zero-fill and copy
            # a padded gradient: 10-20% of a training step for small models (gpt2-tiny, -small-test).
            # The weight gradient is taken in blocks of rows (models/head.py says why).
            weight = self.lm_head.weight
            return project_to_vocabulary(x, weight if weight.shape[0] == vocab else weight[:vocab])
        # GPUs: the padded matmul keeps the tile alignment the padding is for; without padding
        # rows there is no slice to carry through backward.
        logits = self.lm_head(x)
        return logits if logits.shape[-1] == vocab else logits[..., :vocab]

    def new_kv_caches(self, batch: int, max_len: int) -> list[KVCache]:
        ref = self.tok_emb.weight
        return [
            KVCache(batch, self.config.kv_heads, max_len, self.config.head_dim, ref.device, ref.dtype)
            for _ in self.blocks
        ]

    @torch.no_grad()
    def resize_vocab(self, vocab_size: int) -> None:
        """Grow (or shrink) the vocabulary, keeping the rows of tokens that remain.

        New rows start at the mean of the old embeddings, so a new special token's initial
        logit and representation are those of an average token rather than random noise.
        """
        old_vocab = self.config.vocab_size
        self.config = dataclasses.replace(self.config, vocab_size=vocab_size)
        rows, keep = self.config.padded_vocab_size, min(old_vocab, vocab_size)

        def resized(old: torch.Tensor) -> nn.Parameter:
            new = old.new_zeros(rows, old.shape[1])
            new[:keep] = old[:keep]
            if vocab_size > old_vocab:
                new[old_vocab:vocab_size] = old[:old_vocab].mean(dim=0)
            return nn.Parameter(new, requires_grad=old.requires_grad)

        self.tok_emb.weight = resized(self.tok_emb.weight)
        self.tok_emb.num_embeddings = rows
        if self.config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        else:
            self.lm_head.weight = resized(self.lm_head.weight)
        self.lm_head.out_features = rows


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (a tied weight counts once); works on the meta device."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
