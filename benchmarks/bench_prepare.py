"""Throughput of `gptrain data prepare` against bare tiktoken on the same text, in the same run.

    .venv/bin/python benchmarks/bench_prepare.py [--input RAW_DIR] [--copies 2] [--workers 1,4]

Without --input it builds RAW_DIR in a temporary folder from the English books of the shared
Gutenberg mirror (../shared/gutenberg-mirror), `--copies` times over under new ids. For each
worker count it measures the whole `run_prepare` (listing, reading, cleaning, tokenizing,
writing and hashing shards, manifests) and `encode_ordinary_batch(texts, num_threads=1)` on
the cleaned text of the books prepare keeps (the same tokens), alternating the two
--repeats times and keeping the best of each. Bare tiktoken gets new copies of the texts
each time: a str keeps the UTF-8 form tiktoken asks it for, so reusing the same objects
would skip, from the second run on, a conversion that prepare's freshly cleaned text needs.
It prints, per worker: raw MB/s, tokens/s, and the ratio to bare tiktoken (prepare also cleans
the prose and sketches each book for dedup, about twice the tokenization's work: ~0.35-0.4),
by wall clock and by CPU time (parent and workers together; steadier than wall clock on a
machine busy with other work).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

from gptrain import storage
from gptrain.data.catalog import CATALOG_PATH, read_catalog
from gptrain.data.clean import clean_book
from gptrain.data.download import mirror_book_path, raw_book_path
from gptrain.data.manifest import load_manifest
from gptrain.data.prepare import PrepareConfig, list_books, run_prepare
from gptrain.tokenizer import get_tokenizer

MIRROR = Path(__file__).resolve().parents[1] / ".." / "shared" / "gutenberg-mirror"


def build_raw_dir(raw: Path, copies: int) -> None:
    """English mirror books, `copies` times (ids offset by 1,000,000 per copy), no catalog."""
    catalog = read_catalog(str(MIRROR / CATALOG_PATH))
    english = [e.book_id for e in catalog if "en" in e.languages]
    (raw / "books").mkdir(parents=True)
    for copy in range(copies):
        for book_id in english:
            source = MIRROR / mirror_book_path(book_id)
            if source.exists():
                shutil.copyfile(source, raw / raw_book_path(book_id + copy * 1_000_000))


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the pool's workers)."""
    usages = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(usage.ru_utime + usage.ru_stime for usage in usages)


def time_prepare(raw: str, out: Path, workers: int) -> tuple[float, float, int]:
    """(wall s, CPU s, tokens of the kept books) of one run_prepare."""
    shutil.rmtree(out, ignore_errors=True)
    wall, cpu = time.perf_counter(), cpu_seconds()
    run_prepare(PrepareConfig(input=raw, out=str(out), workers=workers, val_fraction=0.1))
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return wall, cpu, sum(d["end"] - d["start"] for d in load_manifest(str(out))["documents"])


def time_bare(texts: list[str]) -> tuple[float, float, int]:
    tokenizer = get_tokenizer("gpt2")
    texts = [text.encode().decode() for text in texts]  # new str objects, without a cached UTF-8 form
    wall, cpu = time.perf_counter(), cpu_seconds()
    tokens = tokenizer.encode_ordinary_batch(texts, num_threads=1)
    return time.perf_counter() - wall, cpu_seconds() - cpu, sum(len(t) for t in tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", help="RAW_DIR (default: built from the shared mirror)")
    parser.add_argument("--copies", type=int, default=2, help="mirror copies when building RAW_DIR")
    parser.add_argument("--workers", default="1", help="comma-separated worker counts; give each a free core")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each; the best counts (default: %(default)s)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        raw, out = args.input or str(Path(tmp) / "raw"), Path(tmp) / "ds"
        if args.input is None:
            build_raw_dir(Path(raw), args.copies)
        books = list_books(raw)
        mb = sum(b.bytes for b in books) / 1e6
        print(f"input: {len(books)} books, {mb:.1f} MB raw")

        # A first run warms the page cache and loads the tokenizer; it also tells which books
        # prepare keeps, so that bare tokenization gets exactly their clean text.
        time_prepare(raw, out, workers=1)
        kept = {d["book_id"] for d in load_manifest(str(out))["documents"]}
        texts = [clean_book(storage.read_bytes(b.url)) for b in books if b.book_id in kept]

        for workers in [int(w) for w in args.workers.split(",")]:
            bare_runs, prepare_runs = [], []
            for _ in range(args.repeats):
                bare_runs.append(time_bare(texts))
                prepare_runs.append(time_prepare(raw, out, workers))
                assert prepare_runs[-1][2] == bare_runs[-1][2], "prepare and bare must tokenize the same text"
            tokens = bare_runs[0][2]
            # Best of the runs: noise from other processes only ever adds time.
            bare_wall, bare_cpu = min(r[0] for r in bare_runs), min(r[1] for r in bare_runs)
            wall, cpu = min(r[0] for r in prepare_runs), min(r[1] for r in prepare_runs)
            print(f"bare encode_ordinary_batch, 1 thread: {bare_wall:.2f} s, {tokens / bare_wall:,.0f} tokens/s, "
                  f"{mb / bare_wall:.2f} MB/s")
            print(f"prepare --workers {workers}: {wall:.2f} s; per worker {tokens / wall / workers:,.0f} tokens/s, "
                  f"{mb / wall / workers:.2f} MB/s; ratio to bare: {bare_wall / (wall * workers):.2f} by wall clock, "
                  f"{bare_cpu / cpu:.2f} by CPU time (best of {args.repeats})")


if __name__ == "__main__":
    main()
