"""The data pipeline at scale: a synthetic Gutenberg mirror of 10,000+ books, over rsync, prepared
by 1 and by 2 array tasks, with planted duplicate editions.

    .venv/bin/python benchmarks/bench_scale.py [--books 10000] [--work DIR] [--table FILE]

1. Mirror. Built from the shared mirror's English books (../shared/gutenberg-mirror): each
   synthetic book is 8-160 paragraphs drawn at random from all of their paragraphs (so no
   two books are editions of each other by chance), re-wrapped at 60-78 columns or left as
   printed, under one of PG's header styles (modern, 2000s, no-space, 1990s small print),
   in UTF-8 (with or without BOM), Latin-1 or CRLF. 2% more are planted editions of some of
   them: re-wrapped, re-encoded as Latin-1, re-headed, all in capitals, or split in two
   volumes. The catalog lists them all. Laid out like gutenberg.org's cache.
2. Download: `gptrain data download` from a real `rsync --daemon` on 127.0.0.1 (one task).
3. Prepare: with 1 task, and with 2 tasks at once (an array on this 2-core machine), each
   task one tokenizer worker, then `gptrain data finalize` (dedup over all tasks, checksums).
   Each task runs in its own process; its peak RSS (parent and worker) comes from getrusage.
   Peak RSS is also measured for 1 task on a quarter of the books: it should not grow with
   the corpus.
4. Bare tiktoken: `encode_ordinary` (one thread) on the cleaned text of a sample of the kept
   books, just before each prepare run, for the tokens/s that prepare is compared with.
5. Duplicates: precision and recall of the dropped books against the planted pairs.
6. The full-size catalog: 75,000 rows with PG's columns, parsed.
7. Extrapolation to the whole English corpus (--full-books books of --full-mb-per-book MB,
   assumptions stated in the table) from the measured per-task rates and bytes per token.

Prints a Markdown table (and writes it to --table). Uses about 1 GB of disk per 3,000 books
and well under 1 GB of memory.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO / ".." / "shared" / "gutenberg-mirror"
sys.path.insert(0, str(REPO / "tests"))  # the header builders and the rsync daemon of the test suite

from download_fixtures import RsyncDaemon, full_size_catalog  # noqa: E402
from prepare_fixtures import etext_1990s, modern, no_space, older  # noqa: E402

from gptrain.data.catalog import CATALOG_PATH, parse_catalog, read_catalog  # noqa: E402
from gptrain.data.clean import MARKERS_ONLY, clean_book  # noqa: E402
from gptrain.data.download import mirror_book_path  # noqa: E402

HEADERS = (modern, older, no_space, etext_1990s)
QUOTES = str.maketrans({"’": "'", "‘": "'", "“": '"', "”": '"', "—": "--", "–": "-"})
FIRST_ID = 100_000


def source_paragraphs() -> list[str]:
    """Every paragraph of the shared mirror's English books, as PG has them (wrapped)."""
    catalog = read_catalog(str(MIRROR / CATALOG_PATH))
    paragraphs = []
    for entry in catalog:
        path = MIRROR / mirror_book_path(entry.book_id)
        if "en" in entry.languages and path.exists():
            text = clean_book(path.read_bytes(), MARKERS_ONLY)
            paragraphs += [p for p in text.split("\n\n") if len(p) > 40]
    return paragraphs


def rewrap(paragraph: str, width: int | None) -> str:
    """Prose re-wrapped at `width` (None: as printed); indented blocks (verse) as they are."""
    if width is None or paragraph[:1].isspace():
        return paragraph
    return textwrap.fill(" ".join(paragraph.split()), width)


def encode(text: str, style: int) -> bytes:
    if style == 0:
        return b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode()  # modern PG: BOM, CRLF
    if style == 1:
        return text.translate(QUOTES).encode("latin-1", "replace")  # an 8-bit file
    return text.encode()


def build_mirror(root: Path, books: int, seed: int = 0) -> tuple[dict[int, int], int]:
    """The synthetic mirror; returns ({planted id: original id}, raw bytes)."""
    rng = random.Random(seed)
    pool = source_paragraphs()
    epub = root / "cache" / "epub"
    rows, planted, total = [], {}, 0

    def write(book_id: int, data: bytes, title: str) -> None:
        nonlocal total
        folder = epub / str(book_id)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"pg{book_id}.txt").write_bytes(data)
        rows.append([book_id, "Text", "2004-05-01", title, "en", "Writer, A.", "Fiction", "PR", ""])
        total += len(data)

    bodies = {}
    for index in range(books):
        book_id = FIRST_ID + index
        paragraphs = [rewrap(p, rng.choice([None, 60, 65, 70, 72, 75, 78])) for p in rng.sample(pool, rng.randint(8, 160))]
        body = "\n\n".join(paragraphs)
        header = rng.choice(HEADERS)
        write(book_id, encode(header(book_id, body, f"Book {book_id}"), rng.randrange(3)), f"Book {book_id}")
        if rng.random() < 0.02:
            bodies[book_id] = body
    next_id = FIRST_ID + books
    for number, (original, body) in enumerate(sorted(bodies.items())):
        kind = number % 5
        title = f"Another edition of {original}"
        if kind == 4:  # two volumes
            paragraphs = body.split("\n\n")
            half = len(paragraphs) // 2
            for part in (paragraphs[:half], paragraphs[half:]):
                write(next_id, modern(next_id, "\n\n".join(part), title).encode(), title)
                planted[next_id] = original
                next_id += 1
            continue
        text = {0: "\n\n".join(rewrap(p, 62) for p in body.split("\n\n")), 1: body, 2: body, 3: body.upper()}[kind]
        header = {0: modern, 1: older, 2: etext_1990s, 3: no_space}[kind]
        data = header(next_id, text, title)
        write(next_id, data.translate(QUOTES).encode("latin-1", "replace") if kind == 1 else data.encode(), title)
        planted[next_id] = original
        next_id += 1
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["Text#", "Type", "Issued", "Title", "Language", "Authors", "Subjects", "LoCC", "Bookshelves"])
    writer.writerows(rows)
    (epub / "feeds").mkdir(parents=True, exist_ok=True)
    (epub / "feeds" / "pg_catalog.csv").write_text(out.getvalue())
    return planted, total


def gptrain(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gptrain", *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def run_tasks(commands: list[list[str]]) -> tuple[float, list[dict]]:
    """Run commands at once; (wall s, per process {cpu_s, peak_parent_mb, peak_worker_mb}).

    Each runs under a small wrapper that reports its own and its children's peak RSS."""
    wrapper = (
        "import resource, runpy, sys, json; sys.argv = ['gptrain'] + sys.argv[1:];\n"
        "try:\n    runpy.run_module('gptrain', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
        "s, c = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))\n"
        "print(json.dumps({'cpu_s': s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime,"
        " 'peak_parent_mb': s.ru_maxrss / 1024, 'peak_worker_mb': c.ru_maxrss / 1024}), file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", wrapper, *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for argv in commands]
    results = []
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{proc.args} exited {proc.returncode}:\n{err[-3000:]}")
        results.append(json.loads(err.strip().splitlines()[-1]))
    return time.perf_counter() - started, results


def prepare_commands(raw: Path, out: Path, tasks: int) -> list[list[str]]:
    return [["data", "prepare", "--input", str(raw), "--out", str(out), "--workers", "1", "--no-finalize",
             "--task-index", str(i), "--num-tasks", str(tasks)] for i in range(tasks)]


def bare_tiktoken(raw: Path, book_ids: list[int]) -> tuple[float, int, int]:
    """(CPU s, tokens, raw bytes) of one-thread encode_ordinary on these books' cleaned text
    (cleaning not timed)."""
    from gptrain.tokenizer import get_tokenizer

    tokenizer = get_tokenizer("gpt2")
    texts, size = [], 0
    for book_id in book_ids:
        data = (raw / "books" / f"pg{book_id}.txt").read_bytes()
        size += len(data)
        texts.append(clean_book(data))
    tokenizer.encode_ordinary(texts[0])
    started = resource.getrusage(resource.RUSAGE_SELF)
    tokens = sum(len(tokenizer.encode_ordinary(text)) for text in texts)
    ended = resource.getrusage(resource.RUSAGE_SELF)
    return ended.ru_utime - started.ru_utime, tokens, size


def du(path: Path) -> int:
    """Bytes in a file, or in the files under a folder."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--books", type=int, default=10_000, help="synthetic books (default: %(default)s)")
    parser.add_argument("--work", help="work folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--table", help="also write the Markdown table here")
    parser.add_argument("--full-books", type=int, default=60_000,
                        help="English books in the whole catalog, for the extrapolation (default: %(default)s)")
    parser.add_argument("--full-mb-per-book", type=float, default=0.4,
                        help="average raw MB per English book, for the extrapolation (default: %(default)s)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-"))
    rows: list[tuple[str, str]] = []

    def row(name: str, value: str) -> None:
        rows.append((name, value))
        print(f"{name}: {value}", flush=True)

    try:
        row("machine", f"{os.cpu_count()} cores, 1-minute load average {os.getloadavg()[0]:.1f} at the start "
            "(other engineers' jobs share it)")
        started = time.perf_counter()
        planted, raw_bytes = build_mirror(work / "mirror", args.books)
        total_books = args.books + len(planted)
        row("synthetic mirror", f"{total_books:,} books ({args.books:,} + {len(planted)} planted editions), "
            f"{raw_bytes / 1e6:,.0f} MB, built in {time.perf_counter() - started:.0f} s")

        with RsyncDaemon(work, {"gutenberg": work / "mirror"}) as daemon:
            wall, [download] = run_tasks([["data", "download", "--mirror", daemon.url("gutenberg"),
                                           "--out", str(work / "raw")]])
            report = json.loads((work / "raw" / "reports" / "download-0-of-1.json").read_text())
            assert len(report["downloaded"]) == total_books, report["failed"][:3]
            row("download over rsync (1 task)", f"{wall:.1f} s, {raw_bytes / 1e6 / wall:.0f} MB/s, "
                f"{total_books / wall:,.0f} books/s; peak RSS {download['peak_parent_mb']:.0f} MB")

        catalog, _ = full_size_catalog(75_000)
        started = time.perf_counter()
        parse_catalog(catalog, "pg_catalog.csv")
        row("catalog at full size (75,000 rows, PG's columns)", f"parsed in {time.perf_counter() - started:.2f} s")

        raw = work / "raw"
        sample = random.Random(1).sample(range(FIRST_ID, FIRST_ID + args.books), min(1000, args.books))
        results = {}
        for tasks in (1, 2):
            # Bare tiktoken just before each run: the machine is shared, its speed varies.
            bare_cpu, bare_tokens, bare_bytes = bare_tiktoken(raw, sample)
            bare_rate = bare_tokens / bare_cpu
            row(f"bare tiktoken before the {tasks}-task run (1 thread, cleaned text of {len(sample):,} books)",
                f"{bare_rate:,.0f} tokens/s, {bare_bytes / 1e6 / bare_cpu:.2f} raw MB/s (CPU time)")
            out = work / f"ds-{tasks}"
            wall, per_task = run_tasks(prepare_commands(raw, out, tasks))
            finalize_started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "gptrain", "data", "finalize", str(out)], cwd=REPO, check=True,
                           capture_output=True)
            finalize_s = time.perf_counter() - finalize_started
            manifest = json.loads((out / "manifest.json").read_text())
            tokens = sum(s["tokens"] for split in manifest["splits"].values() for s in split["shards"])
            results[tasks] = manifest
            cpu = sum(t["cpu_s"] for t in per_task)
            row(f"prepare, {tasks} task(s) at once, 1 worker each",
                f"wall {wall:.0f} s; per task {total_books / tasks / wall:,.1f} books/s, "
                f"{tokens / tasks / wall:,.0f} tokens/s ({tokens / tasks / wall / bare_rate:.2f}x bare tiktoken); "
                f"by CPU time {tokens / cpu:,.0f} tokens/s per core ({tokens / cpu / bare_rate:.2f}x bare)")
            row(f"peak RSS per task ({tasks} task(s), {total_books:,} books)",
                ", ".join(f"parent {t['peak_parent_mb']:.0f} MB + worker {t['peak_worker_mb']:.0f} MB"
                          for t in per_task))
            row(f"finalize ({tasks} task(s): dedup over {len(manifest['documents']) + len(manifest['duplicates']):,} "
                "books, checksums)", f"{finalize_s:.1f} s")
        one, two = results[1], results[2]
        same = [d["book_id"] for d in one["duplicates"]] == [d["book_id"] for d in two["duplicates"]]
        row("1 task vs 2 tasks", f"same books dropped: {same}; same kept documents: "
            f"{sorted(d['book_id'] for d in one['documents']) == sorted(d['book_id'] for d in two['documents'])}")

        quarter = work / "raw-quarter"
        (quarter / "books").mkdir(parents=True)
        for path in sorted((raw / "books").iterdir())[: total_books // 4]:
            os.link(path, quarter / "books" / path.name)
        shutil.copyfile(raw / "catalog.csv", quarter / "catalog.csv")
        _, [small] = run_tasks(prepare_commands(quarter, work / "ds-quarter", 1))
        row("peak RSS against corpus size (1 task)", f"{total_books // 4:,} books: parent {small['peak_parent_mb']:.0f} "
            f"MB + worker {small['peak_worker_mb']:.0f} MB; {total_books:,} books: see above")

        # A planted pair is found when one of the two is dropped as the other's duplicate (which
        # one stays is the rule's: the better edition, or the whole of two volumes).
        truth = {frozenset(pair) for pair in planted.items()}
        drops = [frozenset((d["book_id"], d["duplicate_of"])) for d in two["duplicates"]]
        right = [pair for pair in drops if pair in truth]
        row("duplicate editions (planted pairs)", f"{len(planted)} planted, {len(drops)} dropped, {len(right)} of them "
            f"planted pairs: precision {len(right) / max(1, len(drops)):.3f}, recall {len(set(right)) / len(truth):.3f}")

        tokens = sum(s["tokens"] for split in two["splits"].values() for s in split["shards"])
        shard_bytes = du(work / "ds-2" / "shards")
        mb_per_cpu_s = raw_bytes / 1e6 / sum(t["cpu_s"] for t in per_task)  # one task keeps about one core busy
        full_mb = args.full_books * args.full_mb_per_book
        full_tokens = tokens / (raw_bytes / 1e6) * full_mb
        task_hours = full_mb / mb_per_cpu_s / 3600
        manifest_mb = du(work / "ds-2" / "manifest.json") / total_books * args.full_books / 1e6
        row("extrapolation: English corpus", f"assumed {args.full_books:,} books x {args.full_mb_per_book} MB = "
            f"{full_mb / 1e3:,.0f} GB raw -> {full_tokens / 1e9:.1f} B tokens (at the measured tokens per raw MB)")
        row("extrapolation: prepare time", f"{task_hours:.1f} task-hours at {mb_per_cpu_s:.2f} raw MB/s per task: "
            f"{task_hours / 8:.1f} h with 8 tasks, {task_hours / 64 * 60:.0f} min with 64 (plus finalize)")
        row("extrapolation: disk", f"raw {full_mb / 1e3:,.0f} GB + shards {full_tokens * shard_bytes / tokens / 1e9:,.1f} "
            f"GB ({shard_bytes / tokens:.2f} bytes/token) + manifest ~{manifest_mb:.0f} MB")
        row("machine, at the end", f"1-minute load average {os.getloadavg()[0]:.1f}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    table = "| figure | measured |\n|---|---|\n" + "".join(f"| {name} | {value} |\n" for name, value in rows)
    print("\n" + table)
    if args.table:
        Path(args.table).write_text(table)


if __name__ == "__main__":
    main()
