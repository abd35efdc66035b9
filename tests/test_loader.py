"""TokenLoader: windows, per-epoch order, disjoint ranks, exact resume under another world size."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from gptrain.array_task import ArrayTask
from gptrain.data.loader import TokenDataset, TokenLoader, WindowPermutation, eval_batches
from gptrain.data.dedup import Duplicate
from gptrain.data.manifest import load_manifest, merge_task_manifests, read_task_manifests, write_manifest
from gptrain.data.prepare import TaskOutput
from gptrain.errors import GptrainError

EOT = 50256


def synthetic_dataset(root: Path, doc_lengths: list[int], shard_tokens: int, val_every: int = 0,
                      drop: tuple[int, ...] = ()):
    """A real dataset (TaskOutput, then finalize's merge) of random tokens; returns (url, {split: stream}).

    Books in `drop` are resolved as duplicates (of book 0) at finalize: their tokens stay in the
    shards but are cut out of the split streams."""
    params = {
        "tokenizer": {"name": "synthetic"}, "vocab_size": EOT + 1, "eot_id": EOT, "token_dtype": "uint16",
        "val_fraction": 0.0, "split_seed": 0, "shard_tokens": shard_tokens, "languages": ["en"],
        "min_ascii_fraction": 0.9, "cleaning": {}, "dedup": {"enabled": False},
    }
    output = TaskOutput(str(root), ArrayTask(0, 1), params)
    rng = np.random.default_rng(len(doc_lengths))
    streams: dict[str, list] = {"train": [], "val": []}
    for book_id, length in enumerate(doc_lengths):
        split = "val" if val_every and book_id % val_every == 0 else "train"
        tokens = rng.integers(0, EOT, length, dtype=np.uint16)
        output.add_document(book_id, split, tokens)
        if book_id not in drop:
            streams[split] += [tokens, np.array([EOT], dtype=np.uint16)]
    output.close(str(root / "raw"), sources=[])
    duplicates = [Duplicate(book_id, 0, 1.0, 1.0, "edition") for book_id in drop]
    write_manifest(str(root), merge_task_manifests(read_task_manifests(str(root), 1), duplicates))
    return str(root), {name: np.concatenate(parts) for name, parts in streams.items() if parts}


@pytest.fixture
def dataset(tmp_path):
    # 100-token shards and 32-token windows (T=31): many windows straddle a shard boundary, and
    # the dropped books' ranges start and end inside shards.
    lengths = [150, 61, 230, 99, 400, 7, 300, 120]
    url, streams = synthetic_dataset(tmp_path / "ds", lengths, shard_tokens=100, val_every=3, drop=(4, 7))
    return TokenDataset(url), streams


def test_dropped_books_are_cut_out_of_the_splits(tmp_path, dataset):
    data, streams = dataset
    for split, stream in streams.items():
        tokens = data.tokens(split)
        assert tokens.num_tokens == len(stream)
        assert np.array_equal(tokens.read(0, tokens.num_tokens), stream)
        assert np.array_equal(tokens.read(45, 290), stream[45:290])  # across shards and a cut
    assert len(data.document_tokens(6)) == 300 and int(data.document_tokens(5)[0]) == int(streams["train"][-8])
    with pytest.raises(GptrainError, match=r"book 4 is not in the dataset \(it was dropped: duplicate: an edition of book 0"):
        data.document_tokens(4)
    manifest = load_manifest(data.url)
    assert manifest["splits"]["train"]["tokens"] == len(streams["train"])
    assert manifest["splits"]["train"]["documents"] == 3 and manifest["splits"]["val"]["documents"] == 3
    kept = synthetic_dataset(tmp_path / "all", [150, 61, 230, 99, 400, 7, 300, 120], 100, val_every=3)[0]
    assert load_manifest(kept)["fingerprint"] != manifest["fingerprint"]  # same shards, other content


def expected_batch(stream: np.ndarray, window_ids: np.ndarray, context_length: int):
    span = context_length + 1
    windows = np.stack([stream[w * span : (w + 1) * span] for w in window_ids]).astype(np.int64)
    return windows[:, :-1], windows[:, 1:]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 16, 17, 1000, 4097])
def test_permutation_is_a_bijection(size):
    for seed, epoch in [(0, 0), (0, 1), (7, 0)]:
        order = WindowPermutation(size, seed, epoch)(np.arange(size))
        assert sorted(order.tolist()) == list(range(size))
    if size >= 16:
        orders = {tuple(WindowPermutation(size, s, e)(np.arange(size))) for s, e in [(0, 0), (0, 1), (1, 0)]}
        assert len(orders) == 3  # seed and epoch both change the order
        assert tuple(range(size)) not in orders


def test_permutation_memory_does_not_depend_on_size():
    tracemalloc.start()
    ids = WindowPermutation(10**12, seed=3, epoch=5)(np.arange(10**6, 10**6 + 64))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(set(ids.tolist())) == 64 and int(ids.max()) < 10**12
    assert peak < 200_000  # a trillion windows, a few KB: no permutation array


def test_one_epoch_covers_every_window_once_and_batches_match_the_stream(dataset):
    data, streams = dataset
    loader = TokenLoader(data, context_length=31, batch_size=1, seed=5)
    seen = []
    for _ in range(loader.num_windows):
        x, y = loader.next_batch()
        ex, ey = expected_batch(streams["train"], loader.last_window_ids, 31)
        assert x.dtype == torch.long and x.shape == (1, 31) and x.is_contiguous()
        assert np.array_equal(x.numpy(), ex) and np.array_equal(y.numpy(), ey)
        seen += loader.last_window_ids.tolist()
    assert loader.num_windows == len(streams["train"]) // 32
    assert sorted(seen) == list(range(loader.num_windows)) and seen != sorted(seen)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["cursor"] == 0
    loader.next_batch()
    second_epoch = loader.window_ids(np.arange(loader.num_windows, 2 * loader.num_windows))
    assert sorted(second_epoch.tolist()) == list(range(loader.num_windows)) and second_epoch.tolist() != seen


def run_ranks(data, world_size: int, batch_size: int, steps: int, state=None):
    """Run `world_size` rank loaders in lockstep; returns (window ids in rank order per step, state)."""
    loaders = [TokenLoader(data, 31, batch_size, seed=11, rank=r, world_size=world_size) for r in range(world_size)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    ids = []
    for _ in range(steps):
        for loader in loaders:
            loader.next_batch()
            ids += loader.last_window_ids.tolist()
    states = [loader.state_dict() for loader in loaders]
    assert all(s == states[0] for s in states)  # every rank holds the same state
    return ids, states[0]


def test_ranks_are_disjoint_and_resume_under_any_world_size(dataset):
    data, _ = dataset
    reference = TokenLoader(data, 31, 1, seed=11)
    n = reference.num_windows
    first, state = run_ranks(data, world_size=2, batch_size=3, steps=5)  # positions 0..29
    assert len(first) == 30 > n  # crosses into epoch 1
    second, state = run_ranks(data, world_size=3, batch_size=2, steps=4, state=state)  # 30..53
    third, state = run_ranks(data, world_size=1, batch_size=5, steps=2, state=state)  # 54..63
    # Exactly the single-rank sequence: nothing repeated, nothing skipped, across restarts.
    assert first + second + third == reference.window_ids(np.arange(64)).tolist()
    assert (state["epoch"], state["cursor"]) == divmod(64, n)
    for epoch in range(64 // n):
        assert sorted((first + second + third)[epoch * n : (epoch + 1) * n]) == list(range(n))


def test_state_dict_resumes_the_exact_batch(dataset):
    data, _ = dataset
    a = TokenLoader(data, 31, 4, seed=2)
    for _ in range(3):
        a.next_batch()
    b = TokenLoader(data, 31, 4, seed=2)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other_seed = TokenLoader(data, 31, 4, seed=3)
    with pytest.raises(GptrainError, match="seed: saved 2, now 3"):
        other_seed.load_state_dict(a.state_dict())
    with pytest.raises(GptrainError, match="fingerprint"):
        b.load_state_dict(a.state_dict() | {"fingerprint": "0" * 64})
    with pytest.raises(GptrainError, match="context_length"):
        TokenLoader(data, 15, 4, seed=2).load_state_dict(a.state_dict())


def test_eval_batches_are_fixed_and_split_evenly_across_ranks(dataset):
    data, streams = dataset
    everything = [torch.cat(batch) for batch in zip(*eval_batches(data, 31, 4, max_windows=7, split="val"))]
    again = [torch.cat(batch) for batch in zip(*eval_batches(data, 31, 4, max_windows=7, split="val"))]
    assert all(torch.equal(a, b) for a, b in zip(everything, again))
    num_windows = len(streams["val"]) // 32
    ids = np.arange(7) * num_windows // 7
    ex, ey = expected_batch(streams["val"], ids, 31)
    assert np.array_equal(everything[0].numpy(), ex) and np.array_equal(everything[1].numpy(), ey)

    per_rank = [list(eval_batches(data, 31, 2, max_windows=7, split="val", rank=r, world_size=3)) for r in range(3)]
    assert [sum(len(x) for x, _ in batches) for batches in per_rank] == [2, 2, 2]  # 7 -> 6, equal shares
    assert len({len(batches) for batches in per_rank}) == 1  # same number of batches on every rank
    rows = {tuple(row.tolist()) for batches in per_rank for x, _ in batches for row in x}
    assert len(rows) == 6


def test_bad_arguments_and_small_splits_are_rejected(tmp_path, dataset):
    data, _ = dataset
    with pytest.raises(GptrainError, match="fewer than one window of 10001"):
        TokenLoader(data, context_length=10000, batch_size=1)
    with pytest.raises(GptrainError, match="rank 2 is outside 0..1"):
        TokenLoader(data, 31, 1, rank=2, world_size=2)
    with pytest.raises(GptrainError, match="no split 'test'"):
        TokenLoader(data, 31, 1, split="test")
