"""Model architecture: published sizes, compile without graph breaks, padding, caches, sampling."""

from __future__ import annotations

import pytest
import torch

from gptrain.errors import GptrainError
from gptrain.models import MODEL_CONFIGS, Transformer, count_parameters, get_model_config
from gptrain.models.generation import SamplingConfig, generate, sample_next_token

# Published parameter counts (unique; tied embeddings once; GPT-2 without vocabulary padding).
PUBLISHED = {
    "gpt2-124m": 124_439_808,
    "gpt2-355m": 354_823_168,
    "gpt2-774m": 774_030_080,
    "gpt2-1558m": 1_557_611_200,
    "llama2-7b": 6_738_415_616,
    "llama3-8b": 8_030_261_248,
    "llama3.1-8b": 8_030_261_248,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_on_meta_match_published(name):
    config = MODEL_CONFIGS[name]
    with torch.device("meta"):
        model = Transformer(config)
    padding_rows = config.padded_vocab_size - config.vocab_size
    embedding_copies = 1 if config.tie_embeddings else 2
    assert count_parameters(model) - padding_rows * config.d_model * embedding_copies == PUBLISHED[name]
    assert config.num_parameters() == PUBLISHED[name]


def test_vocabulary_is_padded_to_multiple_of_64_and_padding_never_in_logits():
    config = MODEL_CONFIGS["gpt2-tiny"]
    assert config.padded_vocab_size == 50304 and config.vocab_size == 50257
    model = Transformer(config).eval()
    assert model.lm_head.weight.shape[0] == 50304
    with torch.no_grad():
        model.lm_head.weight[50257:] = 100.0  # padding rows would win argmax if they leaked
        logits = model(torch.randint(0, 50257, (2, 8)))
    assert logits.shape == (2, 8, 50257)
    assert int(logits.argmax(-1).max()) < 50257


def test_training_logits_are_the_padded_heads_and_padding_rows_get_no_gradient():
    torch.manual_seed(0)
    model = Transformer(MODEL_CONFIGS["gpt2-tiny"])
    hidden = []
    model.norm_f.register_forward_hook(lambda module, args, out: hidden.append(out))
    idx = torch.randint(0, 50257, (2, 8))
    logits = model(idx)  # on CPU, computed from the head's first vocab_size rows only
    torch.testing.assert_close(logits, model.lm_head(hidden[0])[..., :50257])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
    grad = model.lm_head.weight.grad
    assert grad.shape == (50304, 64) and grad[50257:].count_nonzero() == 0 and grad[:50257].count_nonzero() > 0


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cpu_head_in_blocks_is_bit_identical_to_one_matmul(dtype, compiled):
    # 10,001 rows: two whole blocks of 4,096 and a partial one; 2 x 300 tokens: two blocks of
    # 256 and a partial one.
    from gptrain.models.head import ROWS_PER_BLOCK, project_to_vocabulary

    vocab = 2 * ROWS_PER_BLOCK + 1809
    torch.manual_seed(0)
    hidden = torch.randn(2, 300, 96, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, 96, dtype=dtype, requires_grad=True)
    grad_logits = torch.randn(2, 300, vocab, dtype=dtype)

    def gradients(head):
        hidden.grad = weight.grad = None
        logits = head(hidden, weight)
        logits.backward(grad_logits)
        return logits.detach(), hidden.grad, weight.grad

    head = torch.compile(project_to_vocabulary, fullgraph=True) if compiled else project_to_vocabulary
    expected = gradients(torch.nn.functional.linear)
    for got, want in zip(gradients(head), expected):
        assert got.dtype == dtype and torch.equal(got, want)
    if dtype == torch.float32:  # under autocast it computes in bf16, as F.linear does
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = gradients(torch.nn.functional.linear)
            got = gradients(head)
        assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_compile_fullgraph_matches_eager(name):
    torch.manual_seed(0)
    model = Transformer(MODEL_CONFIGS[name]).eval()
    idx = torch.randint(0, 50257, (2, 16))
    compiled = torch.compile(model, fullgraph=True)  # raises on any graph break
    with torch.no_grad():
        torch.testing.assert_close(compiled(idx), model(idx), atol=1e-5, rtol=1e-5)


def test_gpt2_init_scales_residual_projections():
    model = Transformer(get_model_config("gpt2-small-test"))
    std = model.blocks[0].attn.proj.weight.std().item()
    expected = 0.02 / (2 * model.config.n_layers) ** 0.5
    assert abs(std - expected) / expected < 0.1
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002
    assert model.lm_head.weight is model.tok_emb.weight  # GPT-2 ties embeddings


def test_attention_is_causal():
    torch.manual_seed(0)
    for name in ("gpt2-tiny", "llama-tiny"):
        model = Transformer(MODEL_CONFIGS[name]).eval()
        idx = torch.randint(0, 50257, (1, 12))
        changed = idx.clone()
        changed[0, 8:] = (changed[0, 8:] + 1) % 50257
        with torch.no_grad():
            torch.testing.assert_close(model(idx)[:, :8], model(changed)[:, :8])


def test_dropout_active_only_in_training():
    model = Transformer(get_model_config("gpt2-tiny", dropout=0.5))
    idx = torch.randint(0, 50257, (1, 8))
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_sequence_longer_than_context_is_refused():
    model = Transformer(get_model_config("gpt2-tiny", context_length=16))
    with pytest.raises(ValueError, match="context_length 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_resize_vocab_keeps_old_rows_and_adds_new_ones():
    torch.manual_seed(0)
    for name in ("gpt2-tiny", "llama-tiny"):
        config = get_model_config(name, tie_embeddings=name == "gpt2-tiny")
        model = Transformer(config).eval()
        idx = torch.randint(0, 50257, (1, 6))
        before = model(idx).detach()
        old_emb = model.tok_emb.weight[:50257].detach().clone()
        model.resize_vocab(50257 + 70)  # crosses a padding boundary: 50327 -> 50368 rows
        assert model.config.vocab_size == 50327 and model.tok_emb.weight.shape[0] == 50368
        assert model.lm_head.weight.shape[0] == 50368
        assert torch.equal(model.tok_emb.weight[:50257], old_emb)
        assert torch.allclose(model.tok_emb.weight[50300], old_emb.mean(0))
        after = model(idx)
        assert after.shape[-1] == 50327
        torch.testing.assert_close(after[..., :50257], before)
        model(torch.tensor([[50326]]))  # the new ids embed


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_kv_cache_generation_equals_no_cache_and_naive_argmax(name):
    torch.manual_seed(0)
    model = Transformer(MODEL_CONFIGS[name]).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9] * 9]  # different lengths: left padding + masks
    with_cache = generate(model, prompts, SamplingConfig(max_new_tokens=16))
    without_cache = generate(model, prompts, SamplingConfig(max_new_tokens=16, use_cache=False))
    one_by_one = [generate(model, [p], SamplingConfig(max_new_tokens=16))[0] for p in prompts]
    naive = []
    with torch.no_grad():
        for prompt in prompts:
            tokens = torch.tensor([prompt])
            for _ in range(16):
                tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
            naive.append(tokens[0, len(prompt):].tolist())
    assert with_cache == without_cache == one_by_one == naive


def test_generation_stops_each_row_at_its_stop_token():
    torch.manual_seed(0)
    model = Transformer(MODEL_CONFIGS["gpt2-tiny"]).eval()
    prompts = [[1, 2, 3], [4, 5, 6]]
    free = generate(model, prompts, SamplingConfig(max_new_tokens=10))
    stop = free[0][3]
    stopped = generate(model, prompts, SamplingConfig(max_new_tokens=10, stop_ids=(stop,)))
    assert stopped[0] == free[0][: free[0].index(stop)]
    expected_second = free[1][: free[1].index(stop)] if stop in free[1] else free[1]
    assert stopped[1] == expected_second


def test_sampling_is_seeded_and_respects_top_k_and_top_p():
    torch.manual_seed(0)
    model = Transformer(MODEL_CONFIGS["llama-tiny"]).eval()
    config = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=40, top_p=0.9, seed=7)
    assert generate(model, [[1, 2, 3]], config) == generate(model, [[1, 2, 3]], config)
    logits = torch.tensor([[5.0, 4.0, 3.0, -10.0, -10.0]])
    generator = torch.Generator().manual_seed(0)
    top_k = {int(sample_next_token(logits, SamplingConfig(temperature=5.0, top_k=2), generator)) for _ in range(200)}
    assert top_k == {0, 1}
    # softmax([5,4,3]) ~ [0.665, 0.245, 0.090]: top_p 0.8 keeps the first two only.
    top_p = {int(sample_next_token(logits, SamplingConfig(temperature=1.0, top_p=0.8), generator)) for _ in range(300)}
    assert top_p == {0, 1}


def test_bad_model_configs_are_refused_with_the_key():
    with pytest.raises(GptrainError, match="unknown model 'gpt5'"):
        get_model_config("gpt5")
    with pytest.raises(GptrainError, match="n_kv_heads"):
        get_model_config("llama-tiny", n_kv_heads=3)
    with pytest.raises(GptrainError, match="unknown model config keys"):
        get_model_config("gpt2-tiny", n_layer=3)
    with pytest.raises(GptrainError, match="model.attention"):
        get_model_config("gpt2-tiny", attention="flash")
    with pytest.raises(GptrainError, match="model.vocab_pad_multiple"):
        get_model_config("gpt2-tiny", vocab_pad_multiple=0)
    with pytest.raises(GptrainError, match="prompt of"):
        generate(Transformer(get_model_config("gpt2-tiny", context_length=8)), [[1] * 8], SamplingConfig())


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_implementation_switches_compute_the_same_function_from_the_same_checkpoint(name):
    """`gptrain bench`'s rungs: the stored-mask attention, three Q/K/V matmuls and the unpadded
    vocabulary load the default model's state dict (padding rows aside) and give its logits,
    gradients and generations."""
    import dataclasses

    base = dataclasses.replace(MODEL_CONFIGS[name], context_length=32)
    torch.manual_seed(0)
    reference = Transformer(base)
    ids = torch.randint(0, base.vocab_size, (2, 32))
    expected = reference(ids)
    expected.logsumexp(-1).mean().backward()
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    expected_tokens = generate(reference.eval(), prompts, SamplingConfig(max_new_tokens=6))
    textbook = dict(attention="masked", fused_qkv=False, vocab_pad_multiple=1)
    for switches in [{"attention": "masked"}, {"fused_qkv": False}, {"vocab_pad_multiple": 1}, textbook]:
        model = Transformer(dataclasses.replace(base, **switches))
        shapes = {key: value.shape for key, value in model.state_dict().items()}
        assert shapes.keys() == reference.state_dict().keys(), switches  # the mask is not persistent
        model.load_state_dict({key: value[: shapes[key][0]] for key, value in reference.state_dict().items()})
        logits = model(ids)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        logits.logsumexp(-1).mean().backward()
        for (key, param), ref_param in zip(model.named_parameters(), reference.parameters()):
            rows = param.shape[0]
            torch.testing.assert_close(param.grad, ref_param.grad[:rows], atol=1e-6, rtol=1e-4, msg=f"{switches} {key}")
        assert generate(model.eval(), prompts, SamplingConfig(max_new_tokens=6)) == expected_tokens, switches
    assert Transformer(dataclasses.replace(base, vocab_pad_multiple=1)).tok_emb.weight.shape[0] == 50257
