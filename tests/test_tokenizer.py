"""gptrain.tokenizer: GPT-2 with no network at all, Llama 3 rank files, extra special tokens,
streaming decode and the `gptrain tokenizer` commands."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gptrain.cli import main
from gptrain.errors import GptrainError
from gptrain.tokenizer import (
    GPT2_FILE_SHA256,
    LLAMA3_SPECIAL_TOKENS,
    TOKENIZER_FILES_ENV,
    StreamingDecoder,
    Tokenizer,
    get_tokenizer,
    gpt2_cache_path,
    gpt2_source_dir,
    seed_tiktoken_cache,
    tiktoken_cache_dir,
    tokenizer_from_spec,
)

REPO = Path(__file__).resolve().parents[1]
GPT2_SENTENCE = "Hello world, this is GPT-2.<|endoftext|>"
GPT2_SENTENCE_IDS = [15496, 995, 11, 428, 318, 402, 11571, 12, 17, 13, 50256]
MULTI_BYTE_TEXT = "naïve — 東京 🙂 Ærøskøbing"

# Runs in a fresh network namespace (no interfaces): proves there is no network, shows that
# plain tiktoken cannot load gpt2 there, then loads it through gptrain.
OFFLINE_SCRIPT = r"""
import json, os, socket, sys, tempfile
import tiktoken
from gptrain.tokenizer import get_tokenizer, tiktoken_cache_dir
try:
    socket.create_connection(("1.1.1.1", 443), timeout=5).close()
    network = True
except OSError:
    network = False
try:
    tiktoken.get_encoding("gpt2")
    plain_tiktoken = "loaded"
except Exception as err:
    plain_tiktoken = type(err).__name__
tok = get_tokenizer("gpt2")
text = sys.argv[1]
ids = tok.encode(text)
print(json.dumps({
    "network": network, "plain_tiktoken": plain_tiktoken, "cache_dir": tiktoken_cache_dir(),
    "cache_files": sorted(os.listdir(tiktoken_cache_dir())), "ids": ids, "decoded": tok.decode(ids),
    "hello": tok.encode("Hello world"), "eot_id": tok.eot_id, "n_vocab": tok.n_vocab,
}))
"""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR", TOKENIZER_FILES_ENV)}
    return {**env, **extra}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Tokenizer:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken-cache")))
        mp.delenv(TOKENIZER_FILES_ENV, raising=False)
        yield get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def llama_model_file(gpt2, tmp_path_factory) -> Path:
    """A Llama 3 style tokenizer.model holding GPT-2's 50,256 byte-level BPE ranks."""
    ranks = gpt2._encoding._mergeable_ranks
    path = tmp_path_factory.mktemp("llama") / "tokenizer.model"
    path.write_bytes(b"".join(base64.b64encode(token) + b" %d\n" % rank
                              for token, rank in sorted(ranks.items(), key=lambda item: item[1])))
    return path


# ---------------------------------------------------------------------------- GPT-2, offline


@pytest.mark.parametrize("cache_env", ["TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR", "TMPDIR"])
def test_gpt2_loads_with_no_network_from_an_empty_cache(tmp_path, cache_env):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    # TMPDIR: neither cache variable set, so tiktoken uses <tmp>/data-gym-cache.
    expected_cache = cache_dir / "data-gym-cache" if cache_env == "TMPDIR" else cache_dir
    text = "Call me Ishmael.<|endoftext|>Chapter 1" + GPT2_SENTENCE
    result = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", OFFLINE_SCRIPT, text],
        env=_clean_env(**{cache_env: str(cache_dir)}), cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["network"] is False
    assert out["plain_tiktoken"] != "loaded"  # tiktoken alone would need the network here
    assert out["cache_dir"] == str(expected_cache)
    assert out["cache_files"] == sorted(gpt2_cache_path("", name) for name in GPT2_FILE_SHA256)
    assert out["hello"] == [15496, 995]
    assert out["ids"][-len(GPT2_SENTENCE_IDS):] == GPT2_SENTENCE_IDS
    assert out["ids"].count(50256) == 2 and out["eot_id"] == 50256 and out["n_vocab"] == 50257
    assert out["decoded"] == text


def test_corrupted_source_file_is_refused(tmp_path, monkeypatch):
    source = tmp_path / "files"
    source.mkdir()
    package_files = Path(gpt2_source_dir())
    shutil.copy(package_files / "encoder.json", source / "encoder.json")
    vocab = bytearray((package_files / "vocab.bpe").read_bytes())
    vocab[1000:1004] = b"XXXX"
    (source / "vocab.bpe").write_bytes(vocab)
    monkeypatch.setenv(TOKENIZER_FILES_ENV, str(source))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))

    with pytest.raises(GptrainError) as err:
        get_tokenizer("gpt2")
    message = str(err.value)
    assert str(source / "vocab.bpe") in message
    assert GPT2_FILE_SHA256["vocab.bpe"] in message and hashlib.sha256(vocab).hexdigest() in message
    assert not os.path.exists(gpt2_cache_path(str(tmp_path / "cache"), "vocab.bpe"))


def test_seed_cache_uses_source_folder_and_replaces_bad_cached_copy(tmp_path, monkeypatch):
    source = tmp_path / "files"
    shutil.copytree(gpt2_source_dir(), source)
    monkeypatch.setenv(TOKENIZER_FILES_ENV, str(source))
    cache = tmp_path / "cache"
    cache.mkdir()
    bad = Path(gpt2_cache_path(str(cache), "vocab.bpe"))
    bad.write_bytes(b"truncated download")

    assert seed_tiktoken_cache(str(cache)) == str(cache)
    for name, sha256 in GPT2_FILE_SHA256.items():
        assert hashlib.sha256(Path(gpt2_cache_path(str(cache), name)).read_bytes()).hexdigest() == sha256
    assert sorted(os.listdir(cache)) == sorted(gpt2_cache_path("", name) for name in GPT2_FILE_SHA256)


def test_cache_dir_follows_tiktoken_rules(tmp_path, monkeypatch):
    for name in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # gettempdir() caches its answer; re-read TMPDIR
    assert tiktoken_cache_dir() == str(tmp_path / "data-gym-cache")
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", "/data-gym")
    assert tiktoken_cache_dir() == "/data-gym"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/tiktoken")
    assert tiktoken_cache_dir() == "/tiktoken"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    with pytest.raises(GptrainError, match="TIKTOKEN_CACHE_DIR"):
        seed_tiktoken_cache()


# ---------------------------------------------------------------------------- Llama 3 style


def test_llama3_model_file_special_tokens_and_round_trip(gpt2, llama_model_file):
    tok = get_tokenizer(str(llama_model_file.parent))  # a folder holding tokenizer.model
    base = 50256
    assert len(LLAMA3_SPECIAL_TOKENS) == len(set(LLAMA3_SPECIAL_TOKENS)) == 256
    assert tok.n_vocab == base + 256
    expected = {
        "<|begin_of_text|>": base, "<|end_of_text|>": base + 1, "<|reserved_special_token_0|>": base + 2,
        "<|finetune_right_pad_id|>": base + 4, "<|reserved_special_token_2|>": base + 5,
        "<|start_header_id|>": base + 6, "<|eot_id|>": base + 9, "<|python_tag|>": base + 10,
        "<|reserved_special_token_3|>": base + 11, "<|reserved_special_token_247|>": base + 255,
    }
    assert {name: tok.special_tokens[name] for name in expected} == expected
    assert (tok.bos_id, tok.eot_id) == (base, base + 1)
    assert set(tok.stop_ids) == {base + 1, base + 8, base + 9}

    text = "<|begin_of_text|>In 1851 Melville wrote 1234567 words.<|end_of_text|>"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eot_id
    assert tok.decode(ids) == text
    # Llama 3's split pattern (digits in threads of three), not GPT-2's, on the same ranks.
    assert [tok.decode([i]) for i in tok.encode("1234567")] == ["123", "456", "7"]
    assert [gpt2.decode([i]) for i in gpt2.encode("1234567")] == ["123", "45", "67"]
    assert tok.encode_ordinary("<|begin_of_text|>")[0] != tok.bos_id


def test_llama3_long_runs_encode_without_crashing(llama_model_file):
    tok = get_tokenizer(str(llama_model_file))
    # One million spaces overflow the regex stack of Llama 3's pattern in tiktoken itself.
    texts = ["The end." + " " * 1_000_000 + "Finis", "x" * 60_001, "short text", ""]
    batch = tok.encode_ordinary_batch(texts, num_threads=2)
    for text, ids in zip(texts, batch):
        assert ids == tok.encode_ordinary(text)
        assert tok.encode_ordinary_array(text).tolist() == ids  # long runs cut the same way
        assert tok.decode(ids) == text


def test_encode_ordinary_array_matches_the_list(gpt2):
    # Special-token text stays plain text; a lone surrogate gets encode_ordinary's fix-up.
    for text in ("Call me Ishmael.<|endoftext|>Chapter 1", "caf\u00e9 \u201cquoted\u201d", "broken \ud800 pair", ""):
        array = gpt2.encode_ordinary_array(text)
        assert array.dtype == np.uint32 and array.tolist() == gpt2.encode_ordinary(text)
    assert 50256 not in gpt2.encode_ordinary_array("<|endoftext|>").tolist()


def test_llama3_spec_rebuilds_and_detects_a_changed_file(llama_model_file, tmp_path):
    path = tmp_path / "tokenizer.model"
    shutil.copy(llama_model_file, path)
    tok = get_tokenizer(str(path)).with_special_tokens(["<|doc_sep|>"])
    spec = json.loads(json.dumps(tok.spec))
    assert spec == {"name": "llama3", "path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                    "extra_special_tokens": ["<|doc_sep|>"]}
    rebuilt = tokenizer_from_spec(spec)
    assert rebuilt.special_tokens == tok.special_tokens and rebuilt.special_tokens["<|doc_sep|>"] == 50512
    assert rebuilt.encode("A<|doc_sep|>B") == tok.encode("A<|doc_sep|>B")

    path.write_bytes(path.read_bytes() + base64.b64encode(b"zzzzqq") + b" 50256\n")
    with pytest.raises(GptrainError, match=str(path)):
        tokenizer_from_spec(spec)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"SGVsbG8= 0\nnot-base64! 1\n", ":2: expected 'base64-token rank'"),
     (b"SGVsbG8= 0\nd29ybGQ= 5\n", "ranks are not the distinct numbers 0..1")],
)
def test_malformed_rank_file_is_refused(tmp_path, content, message):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(GptrainError, match=str(path)) as err:
        get_tokenizer(str(path))
    assert message in str(err.value)


def test_unknown_tokenizer_names_the_value(tmp_path):
    with pytest.raises(GptrainError, match="no-such-tokenizer"):
        get_tokenizer("no-such-tokenizer")
    with pytest.raises(GptrainError, match="has no tokenizer.model"):
        get_tokenizer(str(tmp_path))
    with pytest.raises(GptrainError, match="'name' must be"):
        tokenizer_from_spec({"name": "sentencepiece"})


# ---------------------------------------------------------------------------- special tokens


def test_with_special_tokens_adds_ids_after_the_vocabulary(gpt2):
    chat = gpt2.with_special_tokens(["<|user|>", "<|assistant|>"])
    assert chat.special_tokens == {"<|endoftext|>": 50256, "<|user|>": 50257, "<|assistant|>": 50258}
    assert chat.n_vocab == 50259 and gpt2.n_vocab == 50257  # the original is unchanged
    text = "<|user|>Who wrote Moby-Dick?<|assistant|>Melville.<|endoftext|>"
    ids = chat.encode(text)
    assert ids[0] == 50257 and 50258 in ids and ids[-1] == 50256
    assert chat.decode(ids) == text
    assert len(gpt2.encode_ordinary("<|user|>")) > 1
    assert chat.spec == {"name": "gpt2", "extra_special_tokens": ["<|user|>", "<|assistant|>"]}
    assert tokenizer_from_spec(chat.spec).encode(text) == ids
    assert chat.encode("<|user|>Hi", allowed_special={"<|user|>"}) == [50257, 17250]
    with pytest.raises(ValueError, match="disallowed special token"):
        chat.encode(text, allowed_special=())


@pytest.mark.parametrize("names", [["<|endoftext|>"], ["<|a|>", "<|a|>"], [""]])
def test_with_special_tokens_refuses_duplicates(gpt2, names):
    with pytest.raises(GptrainError, match="special token"):
        gpt2.with_special_tokens(names)


# ---------------------------------------------------------------------------- streaming


def test_streaming_decoder_never_emits_half_characters(gpt2):
    ids = gpt2.encode(MULTI_BYTE_TEXT)
    decoder = StreamingDecoder(gpt2)
    pieces = [decoder.push(i) for i in ids]
    assert "" in pieces  # some tokens end inside a character (東, 京 and 🙂 span several tokens)
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) + decoder.flush() == MULTI_BYTE_TEXT
    assert gpt2.decode_bytes(ids) == MULTI_BYTE_TEXT.encode()

    # A stream cut inside a character: the held-back bytes come out as U+FFFD on flush.
    decoder = StreamingDecoder(gpt2)
    partial = "".join(decoder.push(i) for i in gpt2.encode("東")[:1])
    assert partial == "" and decoder.flush() == "\ufffd"


# ---------------------------------------------------------------------------- CLI


def test_cli_encode_and_seed_cache(gpt2, llama_model_file, tmp_path, capsys):
    assert main(["tokenizer", "encode", "Hello world"]) == 0
    assert capsys.readouterr().out.split() == ["15496", "995"]
    assert main(["tokenizer", "encode", "<|begin_of_text|>Hi", "--tokenizer", str(llama_model_file)]) == 0
    assert capsys.readouterr().out.split()[0] == "50256"

    cache = tmp_path / "image-cache"
    assert main(["tokenizer", "seed-cache", "--dir", str(cache)]) == 0
    out = capsys.readouterr().out
    for name, sha256 in GPT2_FILE_SHA256.items():
        assert gpt2_cache_path(str(cache), name) in out
        assert hashlib.sha256(Path(gpt2_cache_path(str(cache), name)).read_bytes()).hexdigest() == sha256
    assert f"TIKTOKEN_CACHE_DIR={cache}" in out

    assert main(["tokenizer", "encode", "x", "--tokenizer", str(tmp_path / "missing.model")]) == 2
    assert "missing.model" in capsys.readouterr().err
