"""Pretrained weights: every layout loads to the same logits and greedy tokens as the model it
came from (Hugging Face transformers as the reference), bad checkpoints fail naming the
tensor and file, and exported folders load in transformers and back in gptrain."""

from __future__ import annotations

import json
import shutil
import sys
import uuid

import pytest
import torch
from safetensors.torch import load_file, save_file

from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from gptrain.errors import GptrainError
from gptrain.models import ModelConfig, RopeScaling, Transformer, load_pretrained
from gptrain.models.generation import SamplingConfig, generate
from gptrain.models.transformer import apply_rope
from gptrain.models.weights import save_hf_pretrained

VOCAB = 1000  # not a multiple of 64: the loader pads our embedding rows
PROMPTS = [[5, 17, 256, 999, 3], [42, 7]]
NEW_TOKENS = 8


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that attention is far from uniform, so a wrong RoPE pairing,
    head order or scaling would move the logits well beyond the tolerance."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen) * 0.15
        is_norm_scale = param.ndim == 1 and name.endswith("weight")
        param.copy_(1.0 + noise if is_norm_scale else noise)


def tiny_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    kw = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=VOCAB, n_positions=128, bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(GPT2Config(**(kw | overrides)))
    randomize(model, seed)
    return model.eval()


LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    # A short original context so that all three frequency bands occur with head_dim 16.
    "original_max_position_embeddings": 32,
}


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    kw = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
    )
    model = LlamaForCausalLM(LlamaConfig(**(kw | overrides)))
    randomize(model, seed)
    return model.eval()


@torch.no_grad()
def assert_same_logits(reference: torch.nn.Module, ours: Transformer, is_hf: bool = True) -> None:
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    expected = reference(ids).logits if is_hf else reference(ids)
    assert not ours.training
    torch.testing.assert_close(ours(ids), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def assert_same_greedy_tokens(hf_model, ours: Transformer) -> None:
    # Ours runs the prompts as one left-padded batch; transformers one at a time.
    got = generate(ours, PROMPTS, SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0))
    for prompt, tokens in zip(PROMPTS, got):
        out = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)
        assert len(tokens) == NEW_TOKENS and tokens == out[0, len(prompt):].tolist()


# --- Hugging Face layouts -----------------------------------------------------------------


def test_hf_gpt2_logits_and_greedy_tokens_match_transformers(tmp_path):
    hf = tiny_gpt2()
    hf.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")  # tied: not stored

    ours = load_pretrained(str(tmp_path))
    assert ours.config.family == "gpt2" and ours.config.padded_vocab_size == 1024
    assert ours.lm_head.weight is ours.tok_emb.weight
    assert_same_logits(hf, ours)
    assert_same_greedy_tokens(hf, ours)

    cast = load_pretrained(str(tmp_path / "model.safetensors"), dtype=torch.bfloat16)  # a file path works too
    assert {p.dtype for p in cast.parameters()} == {torch.bfloat16}
    assert torch.equal(cast.blocks[1].mlp.fc.weight, ours.blocks[1].mlp.fc.weight.bfloat16())


def test_hf_gpt2_bare_keys_with_mask_buffers_and_stored_tied_head(tmp_path):
    """GPT2Model-style names (no "transformer." prefix) as older checkpoints store them,
    with their causal-mask buffers and a tied lm_head saved anyway."""
    hf = tiny_gpt2(seed=3)
    hf.save_pretrained(tmp_path)
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(tmp_path / "model.safetensors").items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    tensors["lm_head.weight"] = tensors["wte.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert_same_logits(hf, load_pretrained(str(tmp_path)))


@pytest.mark.parametrize("variant", ["untied-llama3-rope", "tied", "sharded"])
def test_hf_llama_logits_and_greedy_tokens_match_transformers(tmp_path, variant):
    if variant == "tied":
        hf = tiny_llama(seed=1, tie_word_embeddings=True, rope_scaling=None, rope_theta=10000.0)
    else:
        hf = tiny_llama(seed=2)
    hf.save_pretrained(tmp_path, max_shard_size="100KB" if variant == "sharded" else "5GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == (variant == "sharded")

    ours = load_pretrained(str(tmp_path))
    config = ours.config
    assert (config.family, config.n_heads, config.kv_heads, config.d_ff) == ("llama", 4, 2, 128)
    assert config.tie_embeddings == (variant == "tied")
    assert (ours.lm_head.weight is ours.tok_emb.weight) == (variant == "tied")
    assert config.rope_scaling == (None if variant == "tied" else RopeScaling(8.0, 1.0, 4.0, 32))
    assert_same_logits(hf, ours)
    assert_same_greedy_tokens(hf, ours)


# --- the reference book's state dict --------------------------------------------------------


def book_state_dict(hf: GPT2LMHeadModel, qkv_bias: bool = True) -> dict[str, torch.Tensor]:
    """What the book's load_weights_into_gpt produces from GPT-2: Conv1D weights transposed
    into nn.Linear, c_attn split into W_query/W_key/W_value, a separate out_head."""
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    book = {"tok_emb.weight": sd["wte.weight"], "pos_emb.weight": sd["wpe.weight"]}
    for i in range(hf.config.n_layer):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        for name, w, bias in zip(("query", "key", "value"), sd[h + "attn.c_attn.weight"].T.chunk(3),
                                 sd[h + "attn.c_attn.bias"].chunk(3)):
            book[f"{b}att.W_{name}.weight"] = w
            if qkv_bias:
                book[f"{b}att.W_{name}.bias"] = bias
        book[b + "att.out_proj.weight"] = sd[h + "attn.c_proj.weight"].T
        book[b + "att.out_proj.bias"] = sd[h + "attn.c_proj.bias"]
        book[b + "att.mask"] = torch.triu(torch.ones(128, 128), diagonal=1)  # the book's buffer
        book[b + "ff.layers.0.weight"] = sd[h + "mlp.c_fc.weight"].T
        book[b + "ff.layers.0.bias"] = sd[h + "mlp.c_fc.bias"]
        book[b + "ff.layers.2.weight"] = sd[h + "mlp.c_proj.weight"].T
        book[b + "ff.layers.2.bias"] = sd[h + "mlp.c_proj.bias"]
        for norm, ln in (("norm1", "ln_1"), ("norm2", "ln_2")):
            book[f"{b}{norm}.scale"], book[f"{b}{norm}.shift"] = sd[h + ln + ".weight"], sd[h + ln + ".bias"]
    book["final_norm.scale"], book["final_norm.shift"] = sd["ln_f.weight"], sd["ln_f.bias"]
    book["out_head.weight"] = sd["wte.weight"].clone()
    return {k: v.contiguous().clone() for k, v in book.items()}


def test_book_layout_matches_transformers_with_heads_from_the_preset(tmp_path):
    hf = tiny_gpt2(seed=4)  # 2 layers of width 64: the gpt2-tiny preset, 4 heads
    torch.save(book_state_dict(hf), tmp_path / "gpt2-tiny.pth")
    ours = load_pretrained(str(tmp_path / "gpt2-tiny.pth"))
    assert (ours.config.n_heads, ours.config.tie_embeddings, ours.config.norm_eps) == (4, False, 1e-5)
    assert_same_logits(hf, ours)
    assert_same_greedy_tokens(hf, ours)


def test_book_layout_without_qkv_bias_takes_heads_from_config_json(tmp_path):
    hf = tiny_gpt2(seed=5, n_layer=1, n_head=2, n_embd=32)
    with torch.no_grad():
        hf.transformer.h[0].attn.c_attn.bias.zero_()  # the book trains with qkv_bias=False
    # The book's model-and-optimizer file, in a folder of its own.
    torch.save({"model_state_dict": book_state_dict(hf, qkv_bias=False), "optimizer_state_dict": {}},
               tmp_path / "model_and_optimizer.pth")
    with pytest.raises(GptrainError, match=r"model_and_optimizer\.pth: no GPT-2 preset has 1 layers of width 32"):
        load_pretrained(str(tmp_path))

    book_config = {"vocab_size": VOCAB, "context_length": 128, "emb_dim": 32, "n_heads": 2, "n_layers": 1,
                   "drop_rate": 0.0, "qkv_bias": False}
    (tmp_path / "config.json").write_text(json.dumps(book_config))
    ours = load_pretrained(str(tmp_path))
    assert (ours.config.n_heads, ours.config.qkv_bias) == (2, False)
    assert_same_logits(hf, ours)


# --- Meta's original Llama layout -----------------------------------------------------------


def meta_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE as Meta's reference code applies it: consecutive pairs as complex numbers."""
    dim = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    rotations = torch.polar(torch.ones(len(positions), dim // 2, dtype=torch.float64), torch.outer(positions, freqs))
    rotated = torch.view_as_complex(x.double().reshape(*x.shape[:-1], dim // 2, 2)) * rotations
    return torch.view_as_real(rotated).flatten(-2)


def meta_row_order(n_heads: int, head_dim: int) -> list[int]:
    """Meta's row r of a head is our row r//2 (even r) or head_dim/2 + r//2 (odd r)."""
    return [h * head_dim + r // 2 + (r % 2) * head_dim // 2 for h in range(n_heads) for r in range(head_dim)]


def test_meta_rope_convention_is_ours_after_the_row_permutation():
    head_dim, positions = 16, torch.arange(12, dtype=torch.float64)
    x_ours = torch.randn(12, head_dim, dtype=torch.float64)
    x_meta = x_ours[:, meta_row_order(1, head_dim)]
    angles = torch.outer(positions, 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.cat((angles, angles), dim=-1)
    ours_rotated = apply_rope(x_ours, angles.cos(), angles.sin())
    torch.testing.assert_close(meta_rope(x_meta, positions, 10000.0), ours_rotated[:, meta_row_order(1, head_dim)])


def meta_checkpoint(hf: LlamaForCausalLM, n_shards: int) -> list[dict[str, torch.Tensor]]:
    """consolidated.NN.pth state dicts: Meta's names, q/k rows in Meta's RoPE order, and
    tensors split across model-parallel ranks as Meta's code splits them."""
    cfg, sd = hf.config, hf.state_dict()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    q_order = meta_row_order(cfg.num_attention_heads, head_dim)
    k_order = meta_row_order(cfg.num_key_value_heads, head_dim)
    full = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"], "rope.freqs": torch.randn(head_dim // 2)}
    for i in range(cfg.num_hidden_layers):
        L, a, m = f"layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        full |= {
            L + "attention.wq.weight": sd[a + "q_proj.weight"][q_order],
            L + "attention.wk.weight": sd[a + "k_proj.weight"][k_order],
            L + "attention.wv.weight": sd[a + "v_proj.weight"],
            L + "attention.wo.weight": sd[a + "o_proj.weight"],
            L + "feed_forward.w1.weight": sd[m + "gate_proj.weight"],
            L + "feed_forward.w2.weight": sd[m + "down_proj.weight"],
            L + "feed_forward.w3.weight": sd[m + "up_proj.weight"],
            L + "attention_norm.weight": sd[f"model.layers.{i}.input_layernorm.weight"],
            L + "ffn_norm.weight": sd[f"model.layers.{i}.post_attention_layernorm.weight"],
        }
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for name, tensor in full.items():
        kind = name.split(".")[-2]
        if kind in ("wq", "wk", "wv", "w1", "w3", "output"):
            pieces = tensor.chunk(n_shards, dim=0)
        elif kind in ("wo", "w2", "tok_embeddings"):
            pieces = tensor.chunk(n_shards, dim=1)
        else:
            pieces = [tensor] * n_shards
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    return shards


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_layout_matches_transformers(tmp_path, n_shards):
    # Meta sizes the MLP: 64 * 8/3 = 170, times 1.3 = 221, rounded up to a multiple of 32 = 224.
    hf = tiny_llama(seed=6, intermediate_size=224, rope_scaling=None, rope_theta=10000.0)
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": -1, "multiple_of": 32,
              "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5}
    (tmp_path / "params.json").write_text(json.dumps(params))
    for rank, shard in enumerate(meta_checkpoint(hf, n_shards)):
        torch.save(shard, tmp_path / f"consolidated.{rank:02d}.pth")
    ours = load_pretrained(str(tmp_path))
    assert (ours.config.d_ff, ours.config.vocab_size, ours.config.context_length) == (224, VOCAB, 4096)
    assert_same_logits(hf, ours)
    assert_same_greedy_tokens(hf, ours)


# --- bad checkpoints ----------------------------------------------------------------------


@pytest.fixture
def llama_folder(tmp_path):
    tiny_llama(seed=7).save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def rewrite(folder, change) -> None:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_names_tensor_and_file(llama_folder):
    rewrite(llama_folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    pattern = r"llama/model\.safetensors: missing tensor\(s\) 'model\.layers\.1\.mlp\.up_proj\.weight'"
    with pytest.raises(GptrainError, match=pattern):
        load_pretrained(str(llama_folder))


def test_shape_mismatch_names_tensor_file_and_both_shapes(llama_folder):
    rewrite(llama_folder, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(48, 64)}))
    pattern = (r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' "
               r"has shape \[48, 64\], expected \[32, 64\]")
    with pytest.raises(GptrainError, match=pattern):
        load_pretrained(str(llama_folder))


def test_extra_tensor_is_named(llama_folder):
    rewrite(llama_folder, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(128, 64)}))
    with pytest.raises(GptrainError, match=r"unexpected tensor\(s\) 'model\.layers\.2\.mlp\.up_proj\.weight'"):
        load_pretrained(str(llama_folder))


def test_unknown_layouts_say_what_was_looked_for(tmp_path, llama_folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(GptrainError, match=r"empty: unknown weights layout; looked for config\.json .*params\.json"):
        load_pretrained(str(tmp_path / "empty"))
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(GptrainError, match=r"other\.pth: unknown weights layout .*'encoder\.weight'"):
        load_pretrained(str(tmp_path / "other.pth"))
    config = json.loads((llama_folder / "config.json").read_text()) | {"model_type": "mistral"}
    (llama_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(GptrainError, match=r"config\.json: model_type 'mistral' is not supported"):
        load_pretrained(str(llama_folder))
    with pytest.raises(GptrainError, match=r"nowhere: no such file or folder"):
        load_pretrained(str(tmp_path / "nowhere"))


# --- export to the Hugging Face layout ----------------------------------------------------


def gptrain_model(family: str, seed: int) -> Transformer:
    if family == "llama":
        config = ModelConfig(
            family="llama", vocab_size=VOCAB, context_length=128, n_layers=2, n_heads=4, n_kv_heads=2, d_model=64,
            d_ff=96, rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32),
        )
    else:
        config = ModelConfig(
            family="gpt2", vocab_size=VOCAB, context_length=128, n_layers=2, n_heads=4, d_model=64, d_ff=256,
            qkv_bias=True, bias=True, tie_embeddings=True,
        )
    torch.manual_seed(seed)
    model = Transformer(config)
    randomize(model, seed)
    return model.eval()


@pytest.mark.parametrize("family,max_shard_bytes", [("llama", 5 * 2**30), ("gpt2", 100_000)])
def test_export_loads_in_transformers_and_back(tmp_path, family, max_shard_bytes):
    model = gptrain_model(family, seed=8)
    save_hf_pretrained(model, str(tmp_path / "hf"), max_shard_bytes=max_shard_bytes)
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists() == (family == "gpt2")

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == ("LlamaForCausalLM" if family == "llama" else "GPT2LMHeadModel")
    assert_same_logits(hf, model)
    assert_same_greedy_tokens(hf, model)

    reloaded = load_pretrained(str(tmp_path / "hf"))
    assert reloaded.config == model.config
    assert_same_logits(model, reloaded, is_hf=False)

    with pytest.raises(GptrainError, match="already exists; refusing to overwrite"):
        save_hf_pretrained(model, str(tmp_path / "hf"))


def test_export_to_and_load_from_a_url():
    model = gptrain_model("llama", seed=9)
    url = f"memory://gptrain-test-{uuid.uuid4().hex}/exported"
    save_hf_pretrained(model, url)
    assert_same_logits(model, load_pretrained(url), is_hf=False)


def test_export_rejects_what_the_hf_layout_cannot_hold(tmp_path):
    config = ModelConfig(family="gpt2", vocab_size=VOCAB, context_length=64, n_layers=1, n_heads=2, d_model=32,
                         d_ff=128, bias=False)
    with pytest.raises(GptrainError, match="GPT-2 needs bias=True"):
        save_hf_pretrained(Transformer(config), str(tmp_path / "out"))


# --- OpenAI's original GPT-2 TensorFlow checkpoint (the reference book's gpt_download.py) ---


def openai_variables(hf: GPT2LMHeadModel) -> dict[str, torch.Tensor]:
    """GPT-2's weights under the variable names of OpenAI's model.ckpt: conv1d weights
    (1, in, out), LayerNorm gain g and bias b, the head tied to wte (not stored)."""
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    variables = {"model/wte": sd["wte.weight"], "model/wpe": sd["wpe.weight"],
                 "model/ln_f/g": sd["ln_f.weight"], "model/ln_f/b": sd["ln_f.bias"]}
    for i in range(hf.config.n_layer):
        h, o = f"h.{i}.", f"model/h{i}/"
        for ln in ("ln_1", "ln_2"):
            variables[f"{o}{ln}/g"], variables[f"{o}{ln}/b"] = sd[f"{h}{ln}.weight"], sd[f"{h}{ln}.bias"]
        for conv in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            hf_name = h + conv.replace("/", ".")
            variables[f"{o}{conv}/w"], variables[f"{o}{conv}/b"] = sd[hf_name + ".weight"][None], sd[hf_name + ".bias"]
    return variables


def write_openai_checkpoint(variables: dict[str, torch.Tensor], folder, hparams: dict) -> None:
    """hparams.json and a TF1 Saver checkpoint (checkpoint, model.ckpt.index/.data/.meta), as OpenAI's."""
    import tensorflow as tf

    folder.mkdir(parents=True)
    (folder / "hparams.json").write_text(json.dumps(hparams))
    with tf.Graph().as_default():
        saved = [tf.compat.v1.Variable(t.numpy(), name=name) for name, t in variables.items()]
        saver = tf.compat.v1.train.Saver(saved, save_relative_paths=True)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, str(folder / "model.ckpt"))


@pytest.fixture(scope="module")
def openai_gpt2(tmp_path_factory):
    """A tiny GPT-2 with GPT-2's vocabulary as OpenAI released theirs, BPE files included."""
    from gptrain.tokenizer import GPT2_FILE_SHA256, gpt2_source_dir

    hf = tiny_gpt2(seed=11, vocab_size=50257)
    folder = tmp_path_factory.mktemp("openai") / "tiny"
    hparams = {"n_vocab": 50257, "n_ctx": 128, "n_embd": 64, "n_head": 4, "n_layer": 2}
    write_openai_checkpoint(openai_variables(hf), folder, hparams)
    for name in GPT2_FILE_SHA256:  # encoder.json, vocab.bpe
        shutil.copyfile(f"{gpt2_source_dir()}/{name}", folder / name)
    return hf, folder, hparams


def test_openai_tf_checkpoint_loads_like_the_hf_layout(openai_gpt2, tmp_path, capsys):
    from gptrain.checkpoint.checkpointer import load_initial_weights
    from gptrain.cli import main

    hf, folder, _ = openai_gpt2
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001", "model.ckpt.index",
        "model.ckpt.meta", "vocab.bpe",
    ]
    hf.save_pretrained(tmp_path / "hf")
    through_hf = load_pretrained(str(tmp_path / "hf"))
    ours = load_pretrained(str(folder))
    assert ours.config == through_hf.config and ours.lm_head.weight is ours.tok_emb.weight
    assert_same_logits(through_hf, ours, is_hf=False)  # 1e-5
    assert_same_logits(hf, ours)

    # checkpoint.init_from and `gptrain generate --weights` take the folder as well.
    model = Transformer(ours.config)
    load_initial_weights(model, str(folder))
    assert all(torch.equal(t, ours.state_dict()[k]) for k, t in model.state_dict().items())
    assert main(["generate", "--weights", str(folder), "--prompt", "Every effort moves you",
                 "--max-new-tokens", "6", "--temperature", "0", "--no-stream"]) == 0
    from gptrain.tokenizer import get_tokenizer

    tokenizer = get_tokenizer("gpt2")
    (expected,) = generate(ours, [tokenizer.encode("Every effort moves you")], SamplingConfig(max_new_tokens=6))
    assert capsys.readouterr().out == "Every effort moves you" + tokenizer.decode(expected) + "\n"


def test_openai_tf_checkpoint_names_a_missing_or_damaged_variable(openai_gpt2, tmp_path, monkeypatch):
    hf, folder, hparams = openai_gpt2
    variables = openai_variables(hf)
    del variables["model/h1/mlp/c_fc/w"]
    write_openai_checkpoint(variables, tmp_path / "missing", hparams)
    pattern = r"missing/model\.ckpt: missing tensor\(s\) 'model/h1/mlp/c_fc/w' \(OpenAI GPT-2 TensorFlow layout\)"
    with pytest.raises(GptrainError, match=pattern):
        load_pretrained(str(tmp_path / "missing"))

    # The data file cut short: its last bytes belong to model/wte (variables are stored by name).
    shutil.copytree(folder, tmp_path / "damaged")
    data = tmp_path / "damaged" / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(GptrainError, match=r"damaged/model\.ckpt: variable 'model/wte' cannot be read"):
        load_pretrained(str(tmp_path / "damaged"))

    monkeypatch.setitem(sys.modules, "tensorflow", None)  # what `import tensorflow` meets when it is absent
    with pytest.raises(GptrainError, match=r"needs TensorFlow: pip install 'gptrain\[tf\]'"):
        load_pretrained(str(folder))
