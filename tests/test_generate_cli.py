"""`gptrain generate` end to end: an HF folder in, the greedy continuation out."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gptrain.errors import EXIT_BAD_INPUT

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_gpt2_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("hf-gpt2")
    model.save_pretrained(folder)
    return folder, model


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptrain", "generate", *args], capture_output=True, text=True, timeout=300
    )


def test_greedy_continuation_equals_transformers(hf_gpt2_folder):
    from gptrain.tokenizer import get_tokenizer

    folder, hf_model = hf_gpt2_folder
    tokenizer = get_tokenizer("gpt2")
    prompt = "It was the best of times"
    ids = torch.tensor([tokenizer.encode(prompt)])
    expected = hf_model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected_text = prompt + tokenizer.decode(expected[0, ids.shape[1]:].tolist())

    streamed = run_cli("--weights", str(folder), "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == expected_text + "\n"
    batched = run_cli("--weights", str(folder), "--prompt", prompt, "--prompt", "Call me",
                      "--max-new-tokens", "12", "--temperature", "0", "--no-cache")
    assert batched.returncode == 0, batched.stderr
    assert batched.stdout.splitlines()[0] == expected_text


def test_sampling_with_seed_is_reproducible(hf_gpt2_folder):
    folder, _ = hf_gpt2_folder
    args = ("--weights", str(folder), "--prompt", "The sea", "--max-new-tokens", "8",
            "--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--seed", "3")
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.startswith("The sea")


def test_missing_weights_is_a_clear_error(tmp_path):
    result = run_cli("--weights", str(tmp_path / "nope"), "--prompt", "x")
    assert result.returncode == EXIT_BAD_INPUT
    assert "nope" in result.stderr and "Traceback" not in result.stderr
