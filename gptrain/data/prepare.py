"""`gptrain data prepare`: raw books -> clean text -> token shards, as one task of a job array.

Task i of n takes the books `ArrayTask.owns` (book id mod n), in id order. Worker processes
read, clean, filter and tokenize batches of books (`Tokenizer.encode_ordinary_array`); the
parent appends each kept book and an `<|endoftext|>` to its split's stream and cuts the
streams into shards. The task manifest (DATASET/tasks/t<i>of<n>.json) is written last, so it marks a
finished task: a rerun with the same inputs and settings does nothing, and a rerun after a
crash deletes this task's leftovers and writes the same bytes again.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np

from gptrain import storage
from gptrain.array_task import ArrayTask, resolve_array_task
from gptrain.data.catalog import read_catalog
from gptrain.data.clean import LanguageFilter, clean_book
from gptrain.data.download import raw_book_path, raw_book_url, raw_catalog_url
from gptrain.data.manifest import (
    SPLITS,
    VERSION,
    finished_tasks,
    load_manifest,
    manifest_url,
    merge_task_manifests,
    read_task_manifests,
    task_marker_url,
    task_name,
    write_manifest,
)
from gptrain.data.shards import ShardWriter, token_dtype
from gptrain.errors import GptrainError
from gptrain.progress import Progress
from gptrain.tokenizer import Tokenizer, get_tokenizer

log = logging.getLogger("gptrain")

_BOOK_FILE = re.compile(r"pg(\d+)\.txt$")


@dataclass
class PrepareConfig:
    input: str  # RAW_DIR: books/pg<id>.txt and, optionally, catalog.csv
    out: str  # DATASET folder or fsspec URL
    tokenizer: str = "gpt2"
    val_fraction: float = 0.1  # share of books (not tokens) in the validation split
    split_seed: int = 0
    shard_tokens: int = 100_000_000
    languages: tuple[str, ...] = ("en",)  # catalog languages to keep; () keeps any
    min_ascii_fraction: float = 0.9  # the reference's English test; 0 turns it off
    workers: int | None = None  # tokenizer processes; None: the CPUs this process may use
    chunk_bytes: int = 1 << 20  # raw bytes of books per worker batch
    task_index: int | None = None  # None: from the job array's environment
    num_tasks: int | None = None
    finalize: bool = True  # write DATASET/manifest.json once every task has finished

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise GptrainError(f"val_fraction must be within [0, 1), got {self.val_fraction}")
        if self.shard_tokens < 1:
            raise GptrainError(f"shard_tokens must be >= 1, got {self.shard_tokens}")
        if self.workers is None:
            # The CPUs this process may run on (a Slurm or container cpuset), not the node's.
            self.workers = len(os.sched_getaffinity(0))
        if self.workers < 1:
            raise GptrainError(f"workers must be >= 1, got {self.workers}")
        if self.chunk_bytes < 1:
            raise GptrainError(f"chunk_bytes must be >= 1, got {self.chunk_bytes}")
        self.languages = tuple(self.languages)
        LanguageFilter(self.languages, self.min_ascii_fraction)  # raises on a bad fraction

    @property
    def language_filter(self) -> LanguageFilter:
        return LanguageFilter(self.languages, self.min_ascii_fraction)


@dataclass(frozen=True)
class RawBook:
    book_id: int
    url: str
    file: str  # relative to RAW_DIR
    bytes: int
    languages: tuple[str, ...] | None  # from the catalog; None when it does not list the book

    def source(self, sha256: str, size: int) -> dict[str, Any]:
        """This book's entry in the task manifest's `sources`."""
        languages = list(self.languages) if self.languages else None
        return {"book_id": self.book_id, "file": self.file, "bytes": size, "sha256": sha256, "languages": languages}


def split_of(book_id: int, val_fraction: float, seed: int) -> str:
    """A book's split: a keyed hash of its id, so it never depends on which other books exist."""
    digest = hashlib.blake2b(f"{seed}:{book_id}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "big") < val_fraction * 2**64 else "train"


def list_books(raw_dir: str) -> list[RawBook]:
    """Every RAW_DIR/books/pg<id>.txt, by id, with the catalog's languages when it has them."""
    if not storage.exists(raw_dir):
        raise GptrainError(f"{raw_dir}: input folder not found")
    books_url = storage.join(raw_dir, "books")
    fs, root = storage.filesystem(books_url)
    ids = {}
    for path, info in fs.glob(f"{root}/pg*.txt", detail=True).items():
        match = _BOOK_FILE.search(path)
        if match and info.get("type") != "directory":
            ids[int(match[1])] = info.get("size") or 0
    if not ids:
        raise GptrainError(f"{books_url}: no pg<id>.txt books; run `gptrain data download` first")
    languages: dict[int, tuple[str, ...]] = {}
    if storage.exists(raw_catalog_url(raw_dir)):
        languages = {e.book_id: e.languages for e in read_catalog(raw_catalog_url(raw_dir)) if e.languages}
    return [
        RawBook(book_id, raw_book_url(raw_dir, book_id), raw_book_path(book_id), size, languages.get(book_id))
        for book_id, size in sorted(ids.items())
    ]


class TaskOutput:
    """One task's shards and manifest: documents go in, shards and the done marker come out."""

    def __init__(self, dataset: str, task: ArrayTask, params: dict[str, Any]):
        self.dataset, self.task, self.params = dataset, task, params
        dtype = np.dtype(params["token_dtype"])
        self.writers = {
            split: ShardWriter(dataset, task_name(task), split, params["shard_tokens"], dtype) for split in SPLITS
        }
        self.eot = np.array([params["eot_id"]], dtype=dtype)
        self.documents: list[dict[str, Any]] = []
        self.dropped: list[dict[str, Any]] = []

    def add_document(self, book_id: int, split: str, tokens: np.ndarray) -> None:
        writer = self.writers[split]
        start = writer.num_tokens
        writer.add(tokens)
        self.documents.append({"book_id": book_id, "split": split, "start": start, "end": writer.num_tokens})
        writer.add(self.eot)

    def drop(self, book_id: int, reason: str) -> None:
        self.dropped.append({"book_id": book_id, "reason": reason})

    def close(self, input_url: str, sources: list[dict[str, Any]]) -> dict[str, Any]:
        """Write the remaining shards, then the task manifest (last: it marks the task done)."""
        shards = [asdict(record) for split in SPLITS for record in self.writers[split].close()]
        marker = {
            "format": "gptrain-task",
            "version": VERSION,
            "task": {"index": self.task.index, "count": self.task.count},
            "input": input_url,
            "params": self.params,
            "sources": sources,
            "documents": self.documents,
            "dropped": self.dropped,
            "shards": shards,
            "split_tokens": {split: self.writers[split].num_tokens for split in SPLITS},
        }
        storage.write_json_atomic(task_marker_url(self.dataset, self.task), marker)
        return marker


def remove_task_files(dataset: str, task: ArrayTask) -> None:
    """Delete this task's marker, shards and any temporary files a killed run left behind, and
    the dataset manifest, which would no longer describe the shards."""
    for url in (manifest_url(dataset), task_marker_url(dataset, task)):
        fs, path = storage.filesystem(url)
        if fs.exists(path):
            fs.rm(path)
    fs, root = storage.filesystem(storage.join(dataset, "shards"))
    for path in fs.glob(f"{root}/*-{task_name(task)}-*"):
        fs.rm(path)


def run_prepare(config: PrepareConfig) -> dict[str, Any]:
    """Run this process's task; returns its task manifest."""
    task = resolve_array_task(config.task_index, config.num_tasks)
    tokenizer = get_tokenizer(config.tokenizer)
    params = _params(config, tokenizer)
    books = [book for book in list_books(config.input) if task.owns(book.book_id)]
    marker_url = task_marker_url(config.out, task)
    if storage.exists(marker_url):
        marker = storage.read_json(marker_url)
        if marker.get("params") == params and _same_books(books, marker.get("sources") or []):
            log.info("prepare %s: already done with these books and settings; nothing to do", task_name(task))
            _finalize_if_complete(config, task, params)
            return marker
        log.info("prepare %s: books or settings changed since the last run; preparing again", task_name(task))
    remove_task_files(config.out, task)

    started = time.monotonic()
    output = TaskOutput(config.out, task, params)
    sources = []
    chunks = _chunks(books, config.chunk_bytes, config.workers)
    # fork: workers inherit the loaded tokenizer instead of rebuilding it, and need no
    # importable __main__ (spawn would re-run a script without a main guard). fsspec resets
    # its IO loop and instance cache in forked children, so they open their own connections.
    context = multiprocessing.get_context("fork")
    init_args = (tokenizer, config.language_filter, params["token_dtype"])
    with (
        context.Pool(max(1, min(config.workers, len(chunks))), initializer=_init_worker, initargs=init_args) as pool,
        Progress(total=sum(b.bytes for b in books), desc=f"prepare {task_name(task)}", unit="B") as progress,
    ):
        for results in pool.imap(_process_chunk, chunks):
            for result in results:
                book_id = result.book.book_id
                sources.append(result.book.source(result.sha256, result.size))
                if result.drop_reason is not None:
                    log.info("prepare %s: dropped book %d: %s", task_name(task), book_id, result.drop_reason)
                    output.drop(book_id, result.drop_reason)
                else:
                    split = split_of(book_id, config.val_fraction, config.split_seed)
                    output.add_document(book_id, split, result.tokens)
                progress.update(result.size)
    marker = output.close(config.input, sources)
    _log_summary(task, marker, time.monotonic() - started)
    _finalize_if_complete(config, task, params)
    return marker


def _params(config: PrepareConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """Everything that decides a task's output bytes besides the books themselves."""
    return {
        "tokenizer": tokenizer.spec,
        "vocab_size": tokenizer.n_vocab,
        "eot_id": tokenizer.eot_id,
        "token_dtype": token_dtype(tokenizer.n_vocab).name,
        "val_fraction": config.val_fraction,
        "split_seed": config.split_seed,
        "shard_tokens": config.shard_tokens,
        "languages": list(config.languages),
        "min_ascii_fraction": config.min_ascii_fraction,
    }


def _same_books(books: list[RawBook], recorded: list[dict[str, Any]]) -> bool:
    """Whether `books` are those a task manifest recorded; reads them only when ids, sizes and
    catalog languages all match."""
    if len(books) != len(recorded) or any(b.source(s["sha256"], b.bytes) != s for b, s in zip(books, recorded)):
        return False
    return all(_book_sha256(b.url) == s["sha256"] for b, s in zip(books, recorded))


def _finalize_if_complete(config: PrepareConfig, task: ArrayTask, params: dict[str, Any]) -> None:
    """The array's last finishing task writes the dataset manifest (others may race: same bytes)."""
    if not config.finalize or finished_tasks(config.out).get(task.count, set()) != set(range(task.count)):
        return
    markers = read_task_manifests(config.out, task.count)
    if any(marker["params"] != params for marker in markers):
        return  # a marker from an earlier run with other settings: that task has yet to redo its part
    manifest = merge_task_manifests(markers)
    if storage.exists(manifest_url(config.out)) and load_manifest(config.out) == manifest:
        return
    write_manifest(config.out, manifest)
    log.info("prepare: all %d tasks done; wrote %s", task.count, manifest_url(config.out))


def _chunks(books: list[RawBook], chunk_bytes: int, workers: int) -> list[list[RawBook]]:
    """Consecutive books in batches of about `chunk_bytes`, smaller when that leaves workers idle."""
    target = max(1, min(chunk_bytes, sum(b.bytes for b in books) // (4 * workers)))
    chunks, current, size = [], [], 0
    for book in books:
        current.append(book)
        size += book.bytes
        if size >= target:
            chunks.append(current)
            current, size = [], 0
    return chunks + [current] if current else chunks


def _log_summary(task: ArrayTask, marker: dict[str, Any], seconds: float) -> None:
    raw = sum(s["bytes"] for s in marker["sources"])
    tokens = marker["split_tokens"]
    log.info(
        "prepare %s: %d books read (%.1f MB), %d kept, %d dropped; tokens: train %d, val %d; %d shards; "
        "%.1f s (%.2f MB/s)",
        task_name(task), len(marker["sources"]), raw / 1e6, len(marker["documents"]), len(marker["dropped"]),
        tokens["train"], tokens["val"], len(marker["shards"]), seconds, raw / 1e6 / max(seconds, 1e-9),
    )


def _read_book(url: str) -> bytes:
    try:
        return storage.read_bytes(url)
    except OSError as err:
        raise GptrainError(f"{url}: cannot read book ({err})") from err


def _book_sha256(url: str) -> str:
    try:
        return storage.sha256_of(url)
    except OSError as err:
        raise GptrainError(f"{url}: cannot read book ({err})") from err


# Worker processes' state, set once per worker by the pool's initializer.
_worker: dict[str, Any] = {}


def _init_worker(tokenizer: Tokenizer, language_filter: LanguageFilter, dtype: str) -> None:
    _worker.update(tokenizer=tokenizer, filter=language_filter, dtype=np.dtype(dtype))


class BookResult(NamedTuple):
    book: RawBook
    sha256: str
    size: int
    drop_reason: str | None  # None: the book is kept
    tokens: np.ndarray | None


def _process_chunk(books: list[RawBook]) -> list[BookResult]:
    """Read, clean, filter and tokenize a batch of books, one after the other."""
    tokenizer, dtype = _worker["tokenizer"], _worker["dtype"]
    results = []
    for book in books:
        data = _read_book(book.url)
        text = clean_book(data)
        reason = "empty after cleaning" if not text else _worker["filter"].rejection(text, book.languages)
        tokens = None if reason else tokenizer.encode_ordinary_array(text).astype(dtype, copy=False)
        results.append(BookResult(book, hashlib.sha256(data).hexdigest(), len(data), reason, tokens))
    return results
