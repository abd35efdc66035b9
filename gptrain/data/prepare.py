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
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np

from gptrain import storage
from gptrain.array_task import ArrayTask, resolve_array_task
from gptrain.data.catalog import read_catalog
from gptrain.data.clean import CleanOptions, LanguageFilter, clean_book
from gptrain.data.dedup import BookSketch, DedupOptions, options_record, signatures_bytes, sketch_book
from gptrain.data.download import raw_book_path, raw_book_url, raw_catalog_url
from gptrain.data.manifest import (
    MANIFEST,
    SPLITS,
    VERSION,
    build_manifest,
    finished_tasks,
    load_manifest,
    manifest_url,
    param_diff,
    read_task_manifests,
    signatures_path,
    task_marker_url,
    task_digests,
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
    clean: CleanOptions = field(default_factory=CleanOptions)  # prose cleaning (recorded in the manifest)
    dedup: DedupOptions = field(default_factory=DedupOptions)  # near-duplicate editions, resolved at finalize
    overwrite: bool = False  # replace a different dataset found in `out` instead of refusing

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
        self.sketches: list[BookSketch] = []

    def add_document(self, book_id: int, split: str, tokens: np.ndarray, sketch: BookSketch | None = None) -> None:
        writer = self.writers[split]
        start = writer.num_tokens
        writer.add(tokens)
        self.documents.append({"book_id": book_id, "split": split, "start": start, "end": writer.num_tokens})
        writer.add(self.eot)
        if sketch is not None:
            self.sketches.append(sketch)

    def drop(self, book_id: int, reason: str) -> None:
        self.dropped.append({"book_id": book_id, "reason": reason})

    def close(self, input_url: str, sources: list[dict[str, Any]]) -> dict[str, Any]:
        """Write the remaining shards and the MinHash signatures, then the task manifest (last:
        it marks the task done)."""
        shards = [asdict(record) for split in SPLITS for record in self.writers[split].close()]
        dedup = None
        if self.params["dedup"]["enabled"]:
            data = signatures_bytes(self.sketches, self.params["dedup"]["num_perm"])
            path = signatures_path(self.task)
            storage.write_bytes_atomic(storage.join(self.dataset, path), data)
            dedup = {
                "books": [sketch.record() for sketch in self.sketches],  # book_id, shingles, encoding, all_caps
                "signatures": {"path": path, "sha256": hashlib.sha256(data).hexdigest()},
            }
        marker = {
            "format": "gptrain-task",
            "version": VERSION,
            "task": {"index": self.task.index, "count": self.task.count},
            "input": input_url,
            "params": self.params,
            "sources": sources,
            "documents": self.documents,
            "dropped": self.dropped,
            "dedup": dedup,
            "shards": shards,
            "split_tokens": {split: self.writers[split].num_tokens for split in SPLITS},
        }
        storage.write_json_atomic(task_marker_url(self.dataset, self.task), marker)
        return marker


_TASK_FILE = re.compile(r"(?:^|[-/])t(\d+)of(\d+)[-.]")


def remove_task_files(dataset: str, task: ArrayTask, other_runs: bool = False) -> None:
    """Delete this task's marker, signatures, shards and any temporary files a killed run left
    behind, and the dataset manifest, which would no longer describe the shards. With
    `other_runs`, also every file of runs with another number of tasks (`--overwrite`)."""
    def doomed(path: str) -> bool:
        match = _TASK_FILE.search(path.rsplit("/", 1)[-1])
        if match is None:
            return False
        index, count = int(match[1]), int(match[2])
        return (index, count) == (task.index, task.count) or (other_runs and count != task.count)

    fs, manifest = storage.filesystem(manifest_url(dataset))  # one filesystem holds the whole dataset
    paths = [manifest] if fs.exists(manifest) else []
    for folder in ("tasks", "shards"):
        root = storage.filesystem(storage.join(dataset, folder))[1]
        fs.invalidate_cache(root)  # other array tasks write here too
        if fs.exists(root):
            paths += [p for p in fs.ls(root, detail=False) if doomed(p)]
    for path in paths:
        try:
            fs.rm(path)
        except FileNotFoundError:
            pass  # another task of an --overwrite array removed it first


def run_prepare(config: PrepareConfig) -> dict[str, Any]:
    """Run this process's task; returns its task manifest."""
    task = resolve_array_task(config.task_index, config.num_tasks)
    tokenizer = get_tokenizer(config.tokenizer)
    params = _params(config, tokenizer)
    books = [book for book in list_books(config.input) if task.owns(book.book_id)]
    marker_url = task_marker_url(config.out, task)
    marker = storage.read_json(marker_url) if storage.exists(marker_url) else None
    difference = _difference(config.out, task, params, books, marker)
    if marker is not None and difference is None:
        log.info("prepare %s: already done with these books and settings; nothing to do", task_name(task))
        _finalize_if_complete(config, task, params)
        return marker
    if difference is not None:
        if not config.overwrite:
            raise GptrainError(
                f"{config.out} holds another dataset: {difference}. Runs trained on it could no longer resume: "
                "pass --overwrite to replace it, or prepare into another folder"
            )
        log.warning("prepare %s: replacing the dataset in %s (%s)", task_name(task), config.out, difference)
    remove_task_files(config.out, task, other_runs=config.overwrite)

    started = time.monotonic()
    output = TaskOutput(config.out, task, params)
    sources = []
    chunks = _chunks(books, config.chunk_bytes, config.workers)
    # fork: workers inherit the loaded tokenizer instead of rebuilding it, and need no
    # importable __main__ (spawn would re-run a script without a main guard). fsspec resets
    # its IO loop and instance cache in forked children, so they open their own connections.
    context = multiprocessing.get_context("fork")
    num_perm = config.dedup.num_perm if config.dedup.enabled else None
    init_args = (tokenizer, config.language_filter, config.clean, num_perm, params["token_dtype"])
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
                    output.add_document(book_id, split, result.tokens, result.sketch)
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
        "cleaning": asdict(config.clean),
        "dedup": options_record(config.dedup),
    }


def _difference(
    dataset: str, task: ArrayTask, params: dict[str, Any], books: list[RawBook], marker: dict[str, Any] | None
) -> str | None:
    """How the dataset already in `dataset` differs from what this task would prepare, or None.

    Differs: this task's marker records other settings or other books; another task's marker
    other settings; markers of a run with another number of tasks; a manifest from another
    run. A finished task of this same run (same settings) is no difference, and neither are
    the leftovers of a killed run (shards without a marker)."""
    if marker is not None:
        if marker.get("params") != params:
            return f"{task_name(task)} was prepared with other settings ({param_diff(marker.get('params') or {}, params)})"
        books_changed = _books_difference(books, marker.get("sources") or [])
        return f"{task_name(task)} was prepared from other books ({books_changed})" if books_changed else None
    for count, indexes in sorted(finished_tasks(dataset).items()):
        if count != task.count:
            return f"tasks/t*of{count}.json are the markers of a run of {count} task(s), this run has {task.count}"
        for index in sorted(indexes - {task.index}):
            other = storage.read_json(task_marker_url(dataset, ArrayTask(index, count)))
            if other.get("params") != params:
                return f"t{index}of{count} was prepared with other settings ({param_diff(other['params'], params)})"
    if storage.exists(manifest_url(dataset)):
        manifest = storage.read_json(manifest_url(dataset))
        if manifest.get("params") != params or manifest.get("num_tasks") != task.count:
            return f"its {MANIFEST} is from a run of {manifest.get('num_tasks')} task(s) with other settings"
    return None


def _books_difference(books: list[RawBook], recorded: list[dict[str, Any]]) -> str | None:
    """What differs between `books` and those a task manifest recorded, or None; reads the
    books only when ids, sizes and catalog languages all match."""
    now, then = {b.book_id: b for b in books}, {s["book_id"]: s for s in recorded}
    added, removed = sorted(now.keys() - then.keys()), sorted(then.keys() - now.keys())
    if added or removed:
        return f"{len(then)} books then, {len(now)} now; " + ", ".join(
            f"{what} {', '.join(map(str, ids[:5]))}{' ...' if len(ids) > 5 else ''}"
            for what, ids in (("added", added), ("removed", removed)) if ids
        )
    for book_id, book in sorted(now.items()):
        source = then[book_id]
        if book.source(source["sha256"], book.bytes) != source or _book_sha256(book.url) != source["sha256"]:
            return f"book {book_id} changed ({book.file})"
    return None


def _finalize_if_complete(config: PrepareConfig, task: ArrayTask, params: dict[str, Any]) -> None:
    """The array's last finishing task writes the dataset manifest (others may race: same bytes)."""
    if not config.finalize or finished_tasks(config.out).get(task.count, set()) != set(range(task.count)):
        return
    markers = read_task_manifests(config.out, task.count)
    if any(marker["params"] != params for marker in markers):
        return  # a marker from an earlier run with other settings: that task has yet to redo its part
    if storage.exists(manifest_url(config.out)) and load_manifest(config.out).get("tasks") == task_digests(markers):
        return  # written from these very task manifests already
    write_manifest(config.out, build_manifest(config.out, markers))
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


def _init_worker(
    tokenizer: Tokenizer, language_filter: LanguageFilter, clean: CleanOptions, num_perm: int | None, dtype: str
) -> None:
    _worker.update(tokenizer=tokenizer, filter=language_filter, clean=clean, num_perm=num_perm, dtype=np.dtype(dtype))


class BookResult(NamedTuple):
    book: RawBook
    sha256: str
    size: int
    drop_reason: str | None  # None: the book is kept
    tokens: np.ndarray | None
    sketch: BookSketch | None  # a kept book's MinHash, with dedup on


def _process_chunk(books: list[RawBook]) -> list[BookResult]:
    """Read, clean, filter, tokenize and sketch a batch of books, one after the other."""
    tokenizer, dtype, num_perm = _worker["tokenizer"], _worker["dtype"], _worker["num_perm"]
    results = []
    for book in books:
        data = _read_book(book.url)
        text = clean_book(data, _worker["clean"])
        reason = "empty after cleaning" if not text else _worker["filter"].rejection(text, book.languages)
        tokens = sketch = None
        if reason is None:
            tokens = tokenizer.encode_ordinary_array(text).astype(dtype, copy=False)
            sketch = sketch_book(book.book_id, data, text, num_perm) if num_perm else None
        results.append(BookResult(book, hashlib.sha256(data).hexdigest(), len(data), reason, tokens, sketch))
    return results
