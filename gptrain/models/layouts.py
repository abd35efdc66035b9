"""Checkpoint layouts: how other codebases name, shape and split the tensors of our model.

A `Layout` pairs the `ModelConfig` read from a checkpoint's own config file (or inferred
from its shapes) with a plan: for each tensor of our `Transformer`, the checkpoint tensors
that fill it, stacked along rows. Fused projections are several parts (q, k, v; gate, up);
the vocabulary padding is the rows left after the last part. The same plan, read the other
way, splits our tensors back into a checkpoint (export).

Layouts: Hugging Face GPT-2 and Llama, OpenAI's original GPT-2 TensorFlow checkpoint
(hparams.json + model.ckpt.*), the PyTorch state dict of Raschka's "Build a Large Language
Model (From Scratch)", and Meta's original Llama release (params.json + consolidated.NN.pth).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from gptrain.errors import GptrainError
from gptrain.models.config import MODEL_CONFIGS, ModelConfig, RopeScaling, get_model_config


@dataclass(frozen=True)
class Part:
    """One checkpoint tensor and where its rows come from."""

    name: str
    shape: tuple[int, ...]  # as stored in the checkpoint
    transposed: bool = False  # GPT-2's Conv1D stores (in, out); nn.Linear is (out, in)
    rope_heads: int = 0  # > 0: rows of this many heads in Meta's interleaved RoPE order

    @property
    def rows(self) -> int:
        return self.shape[1] if self.transposed else self.shape[0]


Plan = dict[str, tuple[Part, ...]]  # our state-dict name -> parts stacked along dim 0


@dataclass(frozen=True)
class Layout:
    name: str
    config: ModelConfig
    plan: Plan
    ignored: re.Pattern | None = None  # checkpoint tensors that are derived buffers, not weights

    def is_ignored(self, name: str) -> bool:
        return self.ignored is not None and self.ignored.fullmatch(name) is not None


def _one(name: str, *shape: int, transposed: bool = False) -> tuple[Part, ...]:
    return (Part(name, tuple(shape), transposed=transposed),)


def _unsupported(settings: dict, supported: dict, file: str) -> None:
    for key, allowed in supported.items():
        if key in settings and settings[key] not in allowed:
            raise GptrainError(f"{file}: {key}={settings[key]!r} is not supported (supported: {allowed})")


def _require(settings: dict, key: str, file: str):
    if key not in settings:
        raise GptrainError(f"{file}: missing key {key!r}")
    return settings[key]


# --- Hugging Face GPT-2 (GPT2LMHeadModel) --------------------------------------------------


def hf_gpt2_config(hf: dict, file: str) -> ModelConfig:
    _unsupported(hf, {
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # both are tanh-approximated GELU
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "reorder_and_upcast_attn": (False,),
    }, file)
    d_model = _require(hf, "n_embd", file)
    return ModelConfig(
        family="gpt2",
        vocab_size=_require(hf, "vocab_size", file),
        context_length=_require(hf, "n_positions", file),
        n_layers=_require(hf, "n_layer", file),
        n_heads=_require(hf, "n_head", file),
        d_model=d_model,
        d_ff=hf.get("n_inner") or 4 * d_model,
        qkv_bias=True,
        bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )


def hf_gpt2_layout(config: ModelConfig, prefix: str = "transformer.") -> Layout:
    """`prefix` is "transformer." as GPT2LMHeadModel saves it, "" as GPT2Model saves it."""
    d, d_ff, vocab = config.d_model, config.d_ff, config.vocab_size
    plan: Plan = {
        "tok_emb.weight": _one(f"{prefix}wte.weight", vocab, d),
        "pos_emb.weight": _one(f"{prefix}wpe.weight", config.context_length, d),
    }
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"{prefix}h.{i}."
        plan |= {
            ours + "norm1.weight": _one(theirs + "ln_1.weight", d),
            ours + "norm1.bias": _one(theirs + "ln_1.bias", d),
            ours + "attn.qkv.weight": _one(theirs + "attn.c_attn.weight", d, 3 * d, transposed=True),
            ours + "attn.qkv.bias": _one(theirs + "attn.c_attn.bias", 3 * d),
            ours + "attn.proj.weight": _one(theirs + "attn.c_proj.weight", d, d, transposed=True),
            ours + "attn.proj.bias": _one(theirs + "attn.c_proj.bias", d),
            ours + "norm2.weight": _one(theirs + "ln_2.weight", d),
            ours + "norm2.bias": _one(theirs + "ln_2.bias", d),
            ours + "mlp.fc.weight": _one(theirs + "mlp.c_fc.weight", d, d_ff, transposed=True),
            ours + "mlp.fc.bias": _one(theirs + "mlp.c_fc.bias", d_ff),
            ours + "mlp.proj.weight": _one(theirs + "mlp.c_proj.weight", d_ff, d, transposed=True),
            ours + "mlp.proj.bias": _one(theirs + "mlp.c_proj.bias", d),
        }
    plan["norm_f.weight"] = _one(f"{prefix}ln_f.weight", d)
    plan["norm_f.bias"] = _one(f"{prefix}ln_f.bias", d)
    if not config.tie_embeddings:
        plan["lm_head.weight"] = _one("lm_head.weight", vocab, d)
    # Older checkpoints store the causal-mask buffers; a tied head may be stored as well.
    ignored = re.compile(rf"{re.escape(prefix)}h\.\d+\.attn\.(bias|masked_bias)|lm_head\.weight")
    return Layout("Hugging Face GPT-2", config, plan, ignored)


def hf_gpt2_config_dict(config: ModelConfig) -> dict:
    if not (config.bias and config.qkv_bias and config.kv_heads == config.n_heads):
        raise GptrainError("Hugging Face GPT-2 needs bias=True, qkv_bias=True and n_kv_heads == n_heads")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_embd": config.d_model,
        "n_layer": config.n_layers,
        "n_head": config.n_heads,
        "n_inner": config.d_ff,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
    }


# --- OpenAI's original GPT-2 release: hparams.json + TensorFlow model.ckpt.* ---------------
# (what the reference book's gpt_download.py fetches). The variables are GPT-2's, named
# model/wte, model/h0/attn/c_attn/w, ...; conv1d weights are stored (1, in, out), read as (in, out).


def openai_gpt2_config(hparams: dict, file: str) -> ModelConfig:
    """hparams.json read as the Hugging Face config it corresponds to (same model, other names;
    the head is wte, tied, as in OpenAI's model.py)."""
    renamed = {"vocab_size": "n_vocab", "n_positions": "n_ctx", "n_embd": "n_embd", "n_layer": "n_layer",
               "n_head": "n_head"}
    return hf_gpt2_config({hf: _require(hparams, theirs, file) for hf, theirs in renamed.items()}, file)


def openai_gpt2_layout(config: ModelConfig) -> Layout:
    """Hugging Face GPT-2's plan under OpenAI's variable names (the same tensors, same shapes)."""
    plan = {
        dest: tuple(dataclasses.replace(part, name=_openai_name(part.name)) for part in parts)
        for dest, parts in hf_gpt2_layout(config, prefix="").plan.items()
    }
    return Layout("OpenAI GPT-2 TensorFlow", config, plan)


def _openai_name(hf_name: str) -> str:
    """h.0.attn.c_attn.weight -> model/h0/attn/c_attn/w, h.0.ln_1.weight -> model/h0/ln_1/g
    (LayerNorm gain), ....bias -> .../b, wte.weight -> model/wte."""
    *path, kind = re.sub(r"^h\.(\d+)\.", r"h\1.", hf_name).split(".")
    if path[-1] in ("wte", "wpe"):
        return f"model/{path[-1]}"
    leaf = "b" if kind == "bias" else ("g" if path[-1].startswith("ln_") else "w")
    return "/".join(["model", *path, leaf])


# --- Hugging Face Llama (LlamaForCausalLM) -------------------------------------------------


def hf_llama_config(hf: dict, file: str) -> ModelConfig:
    _unsupported(hf, {"hidden_act": ("silu",), "mlp_bias": (False,)}, file)
    d_model, n_heads = _require(hf, "hidden_size", file), _require(hf, "num_attention_heads", file)
    if hf.get("head_dim") not in (None, d_model // n_heads):
        raise GptrainError(f"{file}: head_dim={hf['head_dim']} != hidden_size / num_attention_heads is not supported")
    # transformers < 5 writes rope_theta and rope_scaling; 5 writes both inside rope_parameters.
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise GptrainError(f"{file}: RoPE type {rope_type!r} is not supported (supported: default, llama3)")
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScaling(
            factor=float(_require(rope, "factor", file)),
            low_freq_factor=float(_require(rope, "low_freq_factor", file)),
            high_freq_factor=float(_require(rope, "high_freq_factor", file)),
            original_context_length=int(_require(rope, "original_max_position_embeddings", file)),
        )
    attention_bias = hf.get("attention_bias", False)  # on q, k, v and o alike
    return ModelConfig(
        family="llama",
        vocab_size=_require(hf, "vocab_size", file),
        context_length=_require(hf, "max_position_embeddings", file),
        n_layers=_require(hf, "num_hidden_layers", file),
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_model=d_model,
        d_ff=_require(hf, "intermediate_size", file),
        qkv_bias=attention_bias,
        bias=attention_bias,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        rope_scaling=scaling,
    )


def hf_llama_layout(config: ModelConfig) -> Layout:
    d, d_ff, vocab = config.d_model, config.d_ff, config.vocab_size
    q_rows, kv_rows = config.n_heads * config.head_dim, config.kv_heads * config.head_dim
    plan: Plan = {"tok_emb.weight": _one("model.embed_tokens.weight", vocab, d)}
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        attn = theirs + "self_attn."
        plan[ours + "norm1.weight"] = _one(theirs + "input_layernorm.weight", d)
        plan[ours + "attn.qkv.weight"] = (
            Part(attn + "q_proj.weight", (q_rows, d)),
            Part(attn + "k_proj.weight", (kv_rows, d)),
            Part(attn + "v_proj.weight", (kv_rows, d)),
        )
        if config.qkv_bias:
            plan[ours + "attn.qkv.bias"] = (
                Part(attn + "q_proj.bias", (q_rows,)),
                Part(attn + "k_proj.bias", (kv_rows,)),
                Part(attn + "v_proj.bias", (kv_rows,)),
            )
        plan[ours + "attn.proj.weight"] = _one(attn + "o_proj.weight", d, q_rows)
        if config.bias:
            plan[ours + "attn.proj.bias"] = _one(attn + "o_proj.bias", d)
        plan[ours + "norm2.weight"] = _one(theirs + "post_attention_layernorm.weight", d)
        plan[ours + "mlp.fc.weight"] = (
            Part(theirs + "mlp.gate_proj.weight", (d_ff, d)),
            Part(theirs + "mlp.up_proj.weight", (d_ff, d)),
        )
        plan[ours + "mlp.proj.weight"] = _one(theirs + "mlp.down_proj.weight", d, d_ff)
    plan["norm_f.weight"] = _one("model.norm.weight", d)
    if not config.tie_embeddings:
        plan["lm_head.weight"] = _one("lm_head.weight", vocab, d)
    ignored = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq|lm_head\.weight")
    return Layout("Hugging Face Llama", config, plan, ignored)


def hf_llama_config_dict(config: ModelConfig) -> dict:
    if config.qkv_bias != config.bias:
        raise GptrainError("Hugging Face Llama has biases on q, k, v and o together: needs qkv_bias == bias")
    scaling = config.rope_scaling
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.context_length,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None if scaling is None else {
            "rope_type": "llama3",
            "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_context_length,
        },
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": config.qkv_bias,
        "mlp_bias": False,
        "attention_dropout": config.dropout,
    }


# --- Raschka, "Build a Large Language Model (From Scratch)": GPTModel.state_dict() --------

BOOK_MARKER = "trf_blocks.0.att.W_query.weight"


def book_config(shapes: dict[str, tuple[int, ...]], n_heads: int | None, file: str) -> ModelConfig:
    """The book's .pth carries no config: sizes come from the shapes, the head count from
    `n_heads` or else the GPT-2 preset with the same depth and width."""
    for name in ("tok_emb.weight", "pos_emb.weight"):
        if name not in shapes:
            raise GptrainError(f"{file}: missing tensor {name!r}")
    vocab, d_model = shapes["tok_emb.weight"]
    n_layers = sum(1 for name in shapes if re.fullmatch(r"trf_blocks\.\d+\.att\.W_query\.weight", name))
    if n_heads is None:
        matches = {c.n_heads for c in MODEL_CONFIGS.values()
                   if c.family == "gpt2" and (c.n_layers, c.d_model) == (n_layers, d_model)}
        if len(matches) != 1:
            raise GptrainError(
                f"{file}: no GPT-2 preset has {n_layers} layers of width {d_model}, so the number of heads "
                "is unknown; put a config.json with 'n_heads' beside it or name a preset"
            )
        n_heads = matches.pop()
    return ModelConfig(
        family="gpt2",
        vocab_size=vocab,
        context_length=shapes["pos_emb.weight"][0],
        n_layers=n_layers,
        n_heads=n_heads,
        d_model=d_model,
        d_ff=shapes.get("trf_blocks.0.ff.layers.0.weight", (4 * d_model,))[0],
        qkv_bias="trf_blocks.0.att.W_query.bias" in shapes,
        bias=True,
        tie_embeddings=False,  # out_head is a separate nn.Linear
        norm_eps=1e-5,  # the book's LayerNorm
    )


def book_n_heads(hint: dict | None, preset: str | None, file: str) -> int | None:
    """Heads from a config.json beside the .pth (the book's GPT_CONFIG dict) or a preset name."""
    if preset is not None:
        return get_model_config(preset).n_heads
    if hint is not None:
        return int(_require(hint, "n_heads", file))
    return None


def book_layout(config: ModelConfig) -> Layout:
    d, d_ff, vocab = config.d_model, config.d_ff, config.vocab_size
    plan: Plan = {
        "tok_emb.weight": _one("tok_emb.weight", vocab, d),
        "pos_emb.weight": _one("pos_emb.weight", config.context_length, d),
    }
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"trf_blocks.{i}."
        att = theirs + "att."
        plan[ours + "norm1.weight"] = _one(theirs + "norm1.scale", d)
        plan[ours + "norm1.bias"] = _one(theirs + "norm1.shift", d)
        plan[ours + "attn.qkv.weight"] = tuple(Part(f"{att}W_{x}.weight", (d, d)) for x in ("query", "key", "value"))
        if config.qkv_bias:
            plan[ours + "attn.qkv.bias"] = tuple(Part(f"{att}W_{x}.bias", (d,)) for x in ("query", "key", "value"))
        plan[ours + "attn.proj.weight"] = _one(att + "out_proj.weight", d, d)
        plan[ours + "attn.proj.bias"] = _one(att + "out_proj.bias", d)
        plan[ours + "norm2.weight"] = _one(theirs + "norm2.scale", d)
        plan[ours + "norm2.bias"] = _one(theirs + "norm2.shift", d)
        plan[ours + "mlp.fc.weight"] = _one(theirs + "ff.layers.0.weight", d_ff, d)
        plan[ours + "mlp.fc.bias"] = _one(theirs + "ff.layers.0.bias", d_ff)
        plan[ours + "mlp.proj.weight"] = _one(theirs + "ff.layers.2.weight", d, d_ff)
        plan[ours + "mlp.proj.bias"] = _one(theirs + "ff.layers.2.bias", d)
    plan["norm_f.weight"] = _one("final_norm.scale", d)
    plan["norm_f.bias"] = _one("final_norm.shift", d)
    plan["lm_head.weight"] = _one("out_head.weight", vocab, d)
    # The book registers its causal mask as a (persistent) buffer.
    return Layout("reference-book GPTModel", config, plan, re.compile(r"trf_blocks\.\d+\.att\.mask"))


# --- Meta's original Llama release: params.json + consolidated.NN.pth ----------------------

# How model-parallel shards split each tensor (by the name's second-to-last component):
# column-parallel layers split output rows, row-parallel layers split input columns,
# the embedding splits its width; norms are replicated (None).
META_SHARD_DIMS = {
    "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,
    "wo": 1, "w2": 1, "tok_embeddings": 1,
    "attention_norm": None, "ffn_norm": None, "norm": None, "rope": None,
}


def meta_d_ff(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU width as Meta's reference code computes it: 2/3 of 4·dim (same parameter count as
    a 4·dim GELU MLP), times the optional multiplier, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def meta_config(params: dict, embedding_shape: tuple[int, ...] | None, file: str) -> ModelConfig:
    dim, n_heads = _require(params, "dim", file), _require(params, "n_heads", file)
    vocab = params.get("vocab_size", -1)
    if vocab <= 0:  # Llama 2 ships -1: "defined later by the tokenizer"
        if embedding_shape is None:
            raise GptrainError(f"{file}: vocab_size is {vocab} and there is no tok_embeddings.weight to size it")
        vocab = embedding_shape[0]
    rope_theta = float(params.get("rope_theta", 10000.0))
    scaling = None
    if params.get("use_scaled_rope"):
        # Llama 3.1's scaling; Meta's code fixes everything but the factor.
        scaling = RopeScaling(factor=float(params.get("rope_scaling_factor", 8.0)))
    # The context is a runtime argument of Meta's code, not in params.json; default to each
    # generation's trained length (Llama 2: 4096, Llama 3: 8192, Llama 3.1+: 131072).
    default_context = 131072 if scaling else (8192 if rope_theta >= 500000 else 4096)
    return ModelConfig(
        family="llama",
        vocab_size=vocab,
        context_length=params.get("max_seq_len", default_context),
        n_layers=_require(params, "n_layers", file),
        n_heads=n_heads,
        n_kv_heads=params.get("n_kv_heads") or n_heads,
        d_model=dim,
        d_ff=meta_d_ff(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
        norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=rope_theta,
        rope_scaling=scaling,
    )


def meta_layout(config: ModelConfig) -> Layout:
    d, d_ff, vocab = config.d_model, config.d_ff, config.vocab_size
    q_rows, kv_rows = config.n_heads * config.head_dim, config.kv_heads * config.head_dim
    plan: Plan = {"tok_emb.weight": _one("tok_embeddings.weight", vocab, d)}
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"layers.{i}."
        plan[ours + "norm1.weight"] = _one(theirs + "attention_norm.weight", d)
        plan[ours + "attn.qkv.weight"] = (
            Part(theirs + "attention.wq.weight", (q_rows, d), rope_heads=config.n_heads),
            Part(theirs + "attention.wk.weight", (kv_rows, d), rope_heads=config.kv_heads),
            Part(theirs + "attention.wv.weight", (kv_rows, d)),
        )
        plan[ours + "attn.proj.weight"] = _one(theirs + "attention.wo.weight", d, q_rows)
        plan[ours + "norm2.weight"] = _one(theirs + "ffn_norm.weight", d)
        plan[ours + "mlp.fc.weight"] = (
            Part(theirs + "feed_forward.w1.weight", (d_ff, d)),
            Part(theirs + "feed_forward.w3.weight", (d_ff, d)),
        )
        plan[ours + "mlp.proj.weight"] = _one(theirs + "feed_forward.w2.weight", d, d_ff)
    plan["norm_f.weight"] = _one("norm.weight", d)
    plan["lm_head.weight"] = _one("output.weight", vocab, d)
    return Layout("Meta Llama", config, plan, re.compile(r"rope\.freqs"))
