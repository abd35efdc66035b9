"""Training batches from a prepared dataset: memory-mapped shards, seeded order, exact resume.

Windows. A split's token stream (its shards' segments concatenated in manifest order) is cut into
non-overlapping windows of `context_length + 1` tokens: window w is tokens
[w*(T+1), (w+1)*(T+1)), and x = window[:-1], y = window[1:]. Shards are fixed-size cuts of
the stream, not document boundaries, so a window that straddles two shards is read from
both and no token is lost at boundaries; the stream's last partial window is never used.
Windows run across `<|endoftext|>` separators, as in GPT-2's training.

Order. Position p counts windows handed out by all ranks together since the start of
training: epoch = p // num_windows, and the window at p is permutation(seed, epoch) applied
to p % num_windows. The permutation is a keyed Feistel network (a bijection computed per
index, O(1) memory however large the dataset). At each step rank r takes positions
cursor + r*B ... cursor + r*B + B - 1 and every rank advances the cursor by world_size*B,
so the ranks are disjoint, and the state {epoch, cursor} continues exactly under any
world size: no window is repeated or skipped. A batch may straddle two epochs.

Shards on object storage are copied to a local cache (GPTRAIN_CACHE_DIR, default
~/.cache/gptrain) the first time a window needs them, and checked against their sha256.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from gptrain import storage
from gptrain.data.manifest import load_manifest
from gptrain.data.shards import local_copy, open_tokens
from gptrain.errors import GptrainError

if TYPE_CHECKING:
    import torch


class SplitTokens:
    """One split's token stream: segments of its shards (finalize leaves out dropped
    duplicates' ranges); shards are fetched and mapped on first use."""

    def __init__(self, dataset: str, split: dict[str, Any], cache_dir: str | None, verify: bool):
        self.dataset, self.cache_dir, self.verify = dataset, cache_dir, verify
        self._shards = split["shards"]
        self._segments = np.array([s for s in split["segments"] if s[2] > s[1]], dtype=np.int64).reshape(-1, 3)
        self._starts = np.concatenate(([0], np.cumsum(self._segments[:, 2] - self._segments[:, 1])))
        self.num_tokens = int(self._starts[-1])
        self._maps: dict[int, np.ndarray] = {}

    def read(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the stream (a view into the map when it lies in one segment)."""
        if not 0 <= start <= end <= self.num_tokens:
            raise IndexError(f"tokens [{start}, {end}) outside the split's {self.num_tokens} tokens")
        parts = []
        segment = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < end:
            offset, stop = int(self._starts[segment]), min(end, int(self._starts[segment + 1]))
            shard, first, _ = (int(v) for v in self._segments[segment])
            parts.append(self._map(shard)[first + start - offset : first + stop - offset])
            start, segment = stop, segment + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _map(self, index: int) -> np.ndarray:
        if index not in self._maps:
            shard = self._shards[index]
            url = storage.join(self.dataset, shard["path"])
            tokens = open_tokens(local_copy(url, shard["sha256"], self.cache_dir, self.verify))
            if len(tokens) != shard["tokens"]:
                raise GptrainError(f"{url}: shard holds {len(tokens)} tokens, the manifest says {shard['tokens']}")
            self._maps[index] = tokens
        return self._maps[index]


class TokenDataset:
    """A prepared dataset (DATASET/manifest.json), local or on object storage.

    Keeps the shard lists and a compact document index, not the whole manifest, so memory
    grows with the number of books only by a few numbers each. With `verify`, a local shard's
    sha256 is checked the first time it is used (one read of it); copies fetched from object
    storage are always checked before they enter the cache.
    """

    def __init__(self, url: str, cache_dir: str | None = None, verify: bool = True):
        manifest = load_manifest(url)
        self.url, self.cache_dir, self.verify = url, cache_dir, verify
        self.fingerprint: str = manifest["fingerprint"]
        self.tokenizer_spec: dict = manifest["tokenizer"]
        self.vocab_size: int = manifest["vocab_size"]
        self.eot_id: int = manifest["eot_id"]
        self._split_entries = manifest["splits"]
        self._split_names = sorted(self._split_entries)
        docs = manifest["documents"]
        self._doc_ids = np.array([d["book_id"] for d in docs], dtype=np.int64)
        self._doc_spans = np.array(
            [(self._split_names.index(d["split"]), d["start"], d["end"]) for d in docs], dtype=np.int64
        ).reshape(-1, 3)
        self._dropped = {d["book_id"]: d["reason"] for d in manifest["dropped"]}
        self._splits: dict[str, SplitTokens] = {}

    def tokens(self, split: str) -> SplitTokens:
        if split not in self._split_entries:
            raise GptrainError(f"{self.url}: no split {split!r}; it has {', '.join(self._split_names)}")
        if split not in self._splits:
            self._splits[split] = SplitTokens(self.url, self._split_entries[split], self.cache_dir, self.verify)
        return self._splits[split]

    def document_tokens(self, book_id: int) -> np.ndarray:
        """The tokens of one book as the model sees it (without the `<|endoftext|>` after it)."""
        found = np.flatnonzero(self._doc_ids == book_id)
        if len(found) == 0:
            why = f"it was dropped: {self._dropped[book_id]}" if book_id in self._dropped else "no such input book"
            raise GptrainError(f"{self.url}: book {book_id} is not in the dataset ({why})")
        split, start, end = (int(v) for v in self._doc_spans[found[0]])
        return np.asarray(self.tokens(self._split_names[split]).read(start, end))


_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a cheap, well-mixed 64-bit hash, vectorised (wraps mod 2^64)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


class WindowPermutation:
    """A keyed bijection on [0, size): a balanced Feistel network plus cycle walking.

    The network permutes [0, 4^k) for the smallest 4^k >= size; an output >= size is fed
    through again until it lands inside (fewer than 4 passes on average), which keeps it a
    bijection on [0, size).
    """

    ROUNDS = 6

    def __init__(self, size: int, seed: int, epoch: int):
        self.size = size
        half_bits = (max(2, (size - 1).bit_length()) + 1) // 2
        self._half, self._mask = np.uint64(half_bits), np.uint64((1 << half_bits) - 1)
        self._keys = [
            np.uint64(int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}:{r}".encode(), digest_size=8).digest(), "big"))
            for r in range(self.ROUNDS)
        ]

    def __call__(self, index: np.ndarray) -> np.ndarray:
        x = np.array(index, dtype=np.uint64)
        pending = np.ones(x.shape, dtype=bool)
        while pending.any():
            x[pending] = self._encrypt(x[pending])
            pending = x >= self.size
        return x.astype(np.int64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._mask
        for key in self._keys:
            left, right = right, left ^ (_mix64(right ^ key) & self._mask)
        return (left << self._half) | right


class TokenLoader:
    """(x, y) LongTensor batches of shape (batch_size, context_length) for one data-parallel rank.

    Batches are fresh contiguous CPU tensors; with `pin_memory` (CUDA only: pinning needs an
    accelerator) they are page-locked, so `.to(device, non_blocking=True)` copies asynchronously.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        context_length: int,
        batch_size: int,
        split: str = "train",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ):
        if context_length < 1 or batch_size < 1:
            raise GptrainError(f"context_length and batch_size must be >= 1, got {context_length}, {batch_size}")
        if not 0 <= rank < world_size:
            raise GptrainError(f"rank {rank} is outside 0..{world_size - 1}")
        self.dataset, self.split, self.seed = dataset, split, seed
        self.context_length, self.batch_size = context_length, batch_size
        self.rank, self.world_size, self.pin_memory = rank, world_size, pin_memory
        self.tokens = dataset.tokens(split)
        self.num_windows = _num_windows(self.tokens, context_length, dataset.url, split)
        self.epoch, self.cursor = 0, 0
        self.last_window_ids = np.empty(0, dtype=np.int64)  # this rank's windows in the last batch
        self._permutations: dict[int, WindowPermutation] = {}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.epoch * self.num_windows + self.cursor + self.rank * self.batch_size
        self.last_window_ids = self.window_ids(np.arange(first, first + self.batch_size, dtype=np.int64))
        self.epoch, self.cursor = divmod(
            self.epoch * self.num_windows + self.cursor + self.world_size * self.batch_size, self.num_windows
        )
        x, y = _batch(self.tokens, self.last_window_ids, self.context_length)
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def window_ids(self, positions: np.ndarray) -> np.ndarray:
        """Window ids at global positions (windows handed out since epoch 0, all ranks)."""
        epochs, offsets = np.divmod(positions, self.num_windows)
        ids = np.empty_like(positions)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            ids[mask] = self._permutation(int(epoch))(offsets[mask])
        return ids

    def state_dict(self) -> dict[str, Any]:
        """The position shared by all ranks; the same on every rank after every step."""
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "seed": self.seed,
            "fingerprint": self.dataset.fingerprint,
            "split": self.split,
            "context_length": self.context_length,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {
            "seed": self.seed,
            "fingerprint": self.dataset.fingerprint,
            "split": self.split,
            "context_length": self.context_length,
        }
        wrong = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in expected.items() if state.get(k) != v]
        if wrong:
            raise GptrainError(f"loader state does not fit this dataset/loader ({'; '.join(wrong)})")
        if not 0 <= state["cursor"] < self.num_windows or state["epoch"] < 0:
            raise GptrainError(f"loader state position epoch={state['epoch']} cursor={state['cursor']} is invalid")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])

    def _permutation(self, epoch: int) -> WindowPermutation:
        if epoch not in self._permutations:
            self._permutations = {e: p for e, p in self._permutations.items() if e >= epoch - 1}
            self._permutations[epoch] = WindowPermutation(self.num_windows, self.seed, epoch)
        return self._permutations[epoch]


def eval_batches(
    dataset: TokenDataset,
    context_length: int,
    batch_size: int,
    max_windows: int,
    split: str = "val",
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed evaluation set: `max_windows` windows evenly spaced over the split (so it samples
    every part of it), the same at every call; rank r gets every world_size-th one, and all
    ranks get the same number of windows (and batches)."""
    tokens = dataset.tokens(split)
    num_windows = _num_windows(tokens, context_length, dataset.url, split)
    count = min(max_windows, num_windows) // world_size * world_size
    if count == 0:
        raise GptrainError(f"{dataset.url}: split {split!r} has {num_windows} windows, fewer than {world_size} ranks")
    window_ids = (np.arange(count, dtype=np.int64) * num_windows // count)[rank::world_size]
    for start in range(0, len(window_ids), batch_size):
        yield _batch(tokens, window_ids[start : start + batch_size], context_length)


def _num_windows(tokens: SplitTokens, context_length: int, url: str, split: str) -> int:
    num_windows = tokens.num_tokens // (context_length + 1)
    if num_windows == 0:
        raise GptrainError(
            f"{url}: split {split!r} has {tokens.num_tokens} tokens, fewer than one window of {context_length + 1}"
        )
    return num_windows


def _batch(tokens: SplitTokens, window_ids: np.ndarray, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch  # here, so `gptrain data` commands start without importing torch

    span = context_length + 1
    windows = np.empty((len(window_ids), span), dtype=np.int64)
    for row, window in enumerate(window_ids):
        windows[row] = tokens.read(int(window) * span, (int(window) + 1) * span)
    inputs, targets = np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])
    return torch.from_numpy(inputs), torch.from_numpy(targets)
