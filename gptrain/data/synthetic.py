"""A dataset of random GPT-2 token ids, written as `gptrain data prepare` writes one.

For throughput and memory measurements (`gptrain bench`, benchmarks/), where what the tokens
say does not matter, only that the trainer and loader read them exactly as they read a
prepared dataset: the documents go through the real shard writer (TaskOutput) and the real
manifest merge (finalize), so the result opens with TokenDataset like any other.
"""

from __future__ import annotations

import numpy as np

from gptrain.array_task import ArrayTask
from gptrain.data.manifest import finalize
from gptrain.data.prepare import TaskOutput

GPT2_VOCAB, GPT2_EOT = 50257, 50256


def write_random_dataset(
    out: str, train_tokens: int, val_tokens: int = 0, doc_tokens: int = 50_000,
    shard_tokens: int = 16_000_000, seed: int = 0,
) -> str:
    """Documents of `doc_tokens` uniformly random ids (the last one shorter), `train_tokens`
    in the train split and `val_tokens` in the validation split; returns `out`."""
    params = {
        "tokenizer": {"name": "gpt2", "extra_special_tokens": []}, "vocab_size": GPT2_VOCAB, "eot_id": GPT2_EOT,
        "token_dtype": "uint16", "val_fraction": 0.0, "split_seed": 0, "shard_tokens": shard_tokens,
        "languages": ["en"], "min_ascii_fraction": 0.9, "cleaning": {}, "dedup": {"enabled": False},
    }
    output = TaskOutput(out, ArrayTask(0, 1), params)
    rng = np.random.default_rng(seed)
    book_id = 0
    for split, total in (("train", train_tokens), ("val", val_tokens)):
        while total > 0:
            length = min(doc_tokens, total)
            # Each document is followed by <|endoftext|>: together they take `length` + 1 tokens.
            output.add_document(book_id, split, rng.integers(0, GPT2_EOT, max(1, length - 1), dtype=np.uint16))
            total -= length
            book_id += 1
    output.close("synthetic", sources=[])
    finalize(out)
    return out
