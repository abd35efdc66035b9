"""`gptrain data download`: fetch Project Gutenberg plain-text books into RAW_DIR.

Mirrors, in the order Project Gutenberg prefers them for anything beyond a few books:

  rsync://HOST[:PORT]/MODULE, HOST::MODULE    an rsync mirror (rsync.py), e.g.
                                              rsync://aleph.gutenberg.org/gutenberg-epub
  a folder or fsspec URL                      laid out like gutenberg.org (a local mirror)
  http(s)://...                               gutenberg.org (the default) or another http
                                              mirror, for small selections: one politeness
                                              budget for the whole job array

Against an http(s) mirror, `--rate` (default 2 requests/s) and `--concurrency` (4) are the
budget of the whole array: task i of n starts at most rate/n requests per second with
concurrency//n (at least 1) in flight, so an array is no harder on the server than one
task. gutenberg.org itself serves at most MAIN_SITE_MAX_BOOKS books and one task: its
robot policy asks for bulk downloads to go through a mirror.

Layouts: `cache/epub/feeds/pg_catalog.csv` (or `--catalog`) and `cache/epub/<id>/pg<id>.txt`
(rsync mirrors: also PG's collection layout). RAW_DIR (a folder or fsspec URL) receives:

    RAW_DIR/catalog.csv                           the catalog as served (prepare reads languages)
    RAW_DIR/books/pg<id>.txt                      each book's bytes exactly as served
    RAW_DIR/reports/download-<i>-of-<n>.json      what task i of n downloaded, skipped, missed

Books are written atomically (temporary file, then rename), so a book that exists is
complete and a rerun skips it. Job-array tasks split the selected books by id, so any number
of tasks can run at once on the same RAW_DIR without coordination.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from gptrain import storage
from gptrain.array_task import ArrayTask, resolve_array_task
from gptrain.data.catalog import (
    CATALOG_PATH,
    TEXT_TYPE,
    CatalogEntry,
    Selection,
    parse_catalog,
    parse_id_range,
    parse_languages,
    select_books,
)
from gptrain.data.http_mirror import POLITE_HTTP_RATE, FetchError, HttpSettings, Mirror, NotOnMirror
from gptrain.data.rsync import (
    CATALOG_CANDIDATES,
    RsyncMirror,
    RsyncSettings,
    candidate_paths,
    is_rsync_mirror,
    staging_dir,
)
from gptrain.data.shards import default_cache_dir
from gptrain.errors import GptrainError
from gptrain.progress import Progress

log = logging.getLogger("gptrain")

DEFAULT_MIRROR = "https://www.gutenberg.org/"
# gutenberg.org's own hosts: small selections only, from one task (bulk goes through mirrors).
MAIN_SITE_HOSTS = ("www.gutenberg.org", "gutenberg.org")
MAIN_SITE_MAX_BOOKS = 1000
SUGGESTED_MIRROR = "rsync://aleph.gutenberg.org/gutenberg-epub"


def book_file_name(book_id: int) -> str:
    return f"pg{book_id}.txt"


def raw_book_path(book_id: int) -> str:
    """Where a book lies in RAW_DIR, relative to it (what the dataset manifest records)."""
    return f"books/{book_file_name(book_id)}"


def raw_book_url(raw_dir: str, book_id: int) -> str:
    return storage.join(raw_dir, *raw_book_path(book_id).split("/"))


def raw_catalog_url(raw_dir: str) -> str:
    return storage.join(raw_dir, "catalog.csv")


def raw_report_url(raw_dir: str, task_index: int, num_tasks: int) -> str:
    return storage.join(raw_dir, "reports", f"download-{task_index}-of-{num_tasks}.json")


def mirror_book_path(book_id: int) -> str:
    return f"cache/epub/{book_id}/{book_file_name(book_id)}"


@dataclass
class DownloadConfig:
    out: str
    mirror: str = DEFAULT_MIRROR
    languages: tuple[str, ...] = ("en",)
    types: tuple[str, ...] = (TEXT_TYPE,)  # catalog Type values
    subjects: tuple[str, ...] = ()  # any of these substrings in the Subjects column
    bookshelves: tuple[str, ...] = ()  # any of these substrings in the Bookshelves column
    id_ranges: tuple[tuple[int, int], ...] = ()  # inclusive book id ranges
    limit: int | None = None  # the first N selected books by id (before the array split)
    ids: tuple[int, ...] | None = None  # only these books
    task_index: int | None = None  # None: from SLURM_ARRAY_TASK_ID / JOB_COMPLETION_INDEX
    num_tasks: int | None = None  # None: GPTRAIN_NUM_TASKS, or a whole Slurm array's count
    concurrency: int = 4  # http(s): requests in flight, for the whole array; else per task
    rate: float | None = None  # http(s): requests started per second by the whole array, retries included; 0 = no limit
    catalog: str | None = None  # the catalog's path or URL when the mirror has none (PG's rsync collection)
    bwlimit: int | None = None  # rsync mirrors: KiB/s
    retries: int = 5  # further attempts after a timeout, connection error, 5xx or 429
    timeout: float = 60.0  # seconds without progress on connect or read before giving up on an attempt
    backoff: float = 1.0  # first retry delay in seconds; doubles per retry, with jitter

    def __post_init__(self) -> None:
        if not self.languages:
            raise GptrainError("languages: give at least one language code, e.g. 'en'")
        if self.limit is not None and self.limit < 1:
            raise GptrainError(f"limit must be >= 1, got {self.limit}")
        if self.ids is not None and not self.ids:
            raise GptrainError("ids: give at least one book id")
        if self.concurrency < 1:
            raise GptrainError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.rate is not None and self.rate < 0:
            raise GptrainError(f"rate must be >= 0 requests/s (0 = unlimited), got {self.rate}")
        if self.retries < 0:
            raise GptrainError(f"retries must be >= 0, got {self.retries}")
        if self.timeout <= 0:
            raise GptrainError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.backoff < 0:
            raise GptrainError(f"backoff must be >= 0 seconds, got {self.backoff}")
        if self.bwlimit is not None and self.bwlimit < 1:
            raise GptrainError(f"bwlimit must be >= 1 KiB/s, got {self.bwlimit}")
        self.selection  # built here so that a bad selection fails before any download

    @property
    def http_settings(self) -> HttpSettings:
        return HttpSettings(self.rate, self.concurrency, self.retries, self.timeout, self.backoff)

    @property
    def selection(self) -> Selection:
        return Selection(tuple(self.languages), tuple(self.types), tuple(self.subjects), tuple(self.bookshelves),
                         tuple(self.id_ranges))


@dataclass
class DownloadReport:
    mirror: str
    out: str
    languages: list[str]
    task_index: int
    num_tasks: int
    selected: int = 0  # books this task is responsible for
    downloaded: list[dict] = field(default_factory=list)  # book_id, bytes, seconds, attempts
    skipped: list[int] = field(default_factory=list)  # already present in RAW_DIR/books
    not_found: list[dict] = field(default_factory=list)  # book_id, url (HTTP 404/410)
    failed: list[dict] = field(default_factory=list)  # book_id, url, reason, attempts
    bytes_downloaded: int = 0
    started_at: str = ""
    elapsed_s: float = 0.0

    def summary(self) -> str:
        return (
            f"task {self.task_index} of {self.num_tasks}: {self.selected} books selected, "
            f"{len(self.downloaded)} downloaded ({self.bytes_downloaded / 2**20:.1f} MiB), "
            f"{len(self.skipped)} already present, {len(self.not_found)} not on mirror (404), "
            f"{len(self.failed)} failed, in {self.elapsed_s:.1f}s"
        )


def choose_books(entries: list[CatalogEntry], config: DownloadConfig, source: str) -> list[CatalogEntry]:
    """Catalog -> the books all tasks download together: same answer in every task."""
    chosen = select_books(entries, config.selection)
    if config.ids is not None:
        by_id = {e.book_id: e for e in chosen}
        unknown = sorted(set(config.ids) - set(by_id))
        if unknown:
            raise GptrainError(
                f"--ids {','.join(map(str, unknown))}: not {'/'.join(config.types)} books in languages "
                f"{','.join(config.languages)} in {source} (see --languages and the other selection options)"
            )
        chosen = [by_id[book_id] for book_id in sorted(set(config.ids))]
    return chosen[: config.limit]


def download(config: DownloadConfig) -> DownloadReport:
    """Download this array task's share of the selected books; write and return its report."""
    task = resolve_array_task(config.task_index, config.num_tasks)
    started = time.monotonic()
    report = DownloadReport(
        mirror=config.mirror,
        out=config.out,
        languages=list(config.languages),
        task_index=task.index,
        num_tasks=task.count,
        started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    source = _open_mirror(config, task)
    if config.catalog:
        folder, _, name = config.catalog.rpartition("/")
        catalog_bytes, catalog_source = Mirror(folder or ".", config.http_settings).catalog(name)
    else:
        catalog_bytes, catalog_source = source.catalog()
    chosen = choose_books(parse_catalog(catalog_bytes, catalog_source), config, catalog_source)
    check_main_site(config.mirror, task.count, len(chosen))
    mine = [e.book_id for e in chosen if task.owns(e.book_id)]
    report.selected = len(mine)
    try:
        # Also the first write to RAW_DIR: a wrong --out fails here, before any download.
        storage.write_bytes_atomic(raw_catalog_url(config.out), catalog_bytes)
    except OSError as err:
        raise GptrainError(f"--out {config.out}: cannot write {raw_catalog_url(config.out)} ({err})") from err

    present = _books_present(config.out)
    report.skipped = [book_id for book_id in mine if book_file_name(book_id) in present]
    todo = [book_id for book_id in mine if book_file_name(book_id) not in present]
    log.info(
        "download: task %d of %d, %d books from %s (%d already present)",
        task.index, task.count, len(mine), config.mirror, len(report.skipped),
    )
    if todo:
        source.download_books(todo, config.out, report)
    for outcomes in (report.downloaded, report.not_found, report.failed):
        outcomes.sort(key=lambda outcome: outcome["book_id"])
    report.elapsed_s = round(time.monotonic() - started, 3)
    storage.write_json_atomic(raw_report_url(config.out, task.index, task.count), asdict(report))
    log.info("download: %s; report: %s", report.summary(), raw_report_url(config.out, task.index, task.count))
    for failure in report.failed:
        log.warning("download: book %d failed: %s (%s)", failure["book_id"], failure["reason"], failure["url"])
    return report


def _open_mirror(config: DownloadConfig, task: ArrayTask) -> HttpSource | RsyncSource:
    if is_rsync_mirror(config.mirror):
        return RsyncSource(config, task)
    check_main_site(config.mirror, task.count)
    return HttpSource(Mirror(config.mirror, config.http_settings, task.count))


def check_main_site(mirror: str, num_tasks: int, selected: int = 0) -> None:
    """gutenberg.org itself: one task, small selections. Its robot policy asks for anything
    bigger to come from a mirror, and an array of tasks must not multiply the load."""
    if urllib.parse.urlsplit(mirror).hostname not in MAIN_SITE_HOSTS:
        return
    if num_tasks > 1:
        raise GptrainError(
            f"--mirror {mirror}: gutenberg.org asks for bulk downloads to use a mirror, and is downloaded from "
            f"by one task, not an array of {num_tasks}: use an rsync mirror (--mirror {SUGGESTED_MIRROR})"
        )
    if selected > MAIN_SITE_MAX_BOOKS:
        raise GptrainError(
            f"--mirror {mirror}: {selected} books selected; gutenberg.org serves small selections (at most "
            f"{MAIN_SITE_MAX_BOOKS} books) and asks for bulk downloads to use a mirror: --mirror {SUGGESTED_MIRROR} "
            "(or --limit/--ids for a small selection)"
        )


class HttpSource:
    """An http(s) mirror, folder or fsspec URL as a download source: the catalog, then the
    books by a pool of threads, each book on its own, so one bad book never stops the rest."""

    def __init__(self, mirror: Mirror):
        self.mirror = mirror

    def catalog(self) -> tuple[bytes, str]:
        return self.mirror.catalog(CATALOG_PATH)

    def download_books(self, book_ids: list[int], raw_dir: str, report: DownloadReport) -> None:
        pool = ThreadPoolExecutor(max_workers=self.mirror.concurrency, thread_name_prefix="download")
        try:
            futures = [pool.submit(_download_book, self.mirror, raw_dir, book_id) for book_id in book_ids]
            with Progress(total=len(book_ids), desc="download", unit="books") as progress:
                for future in as_completed(futures):
                    outcome, entry = future.result()
                    getattr(report, outcome).append(entry)
                    report.bytes_downloaded += entry.get("bytes", 0)
                    progress.update()
        finally:
            # On an error or Ctrl-C, drop the queued books instead of fetching all of them first.
            pool.shutdown(wait=True, cancel_futures=True)


class RsyncSource:
    """An rsync mirror (rsync.py) as a download source: the catalog, then the task's books in
    one transfer."""

    def __init__(self, config: DownloadConfig, task: ArrayTask):
        settings = RsyncSettings(config.timeout, config.retries, config.backoff, config.bwlimit)
        staging = staging_dir(config.out, f"t{task.index}of{task.count}", default_cache_dir())
        self.mirror = RsyncMirror(config.mirror, settings, staging)

    def catalog(self) -> tuple[bytes, str]:
        path = self.mirror.fetch_first({0: list(CATALOG_CANDIDATES)}).get(0)
        if path is None:
            raise GptrainError(
                f"{self.mirror.url}: no Project Gutenberg catalog there ({' or '.join(CATALOG_CANDIDATES)}); pass "
                "--catalog PATH_OR_URL (e.g. https://www.gutenberg.org/cache/epub/feeds/pg_catalog.csv)"
            )
        return self.mirror.staged(path).read_bytes(), self.mirror.url + path

    def download_books(self, book_ids: list[int], raw_dir: str, report: DownloadReport) -> None:
        """Each book's preferred file (see rsync.py), then moved into RAW_DIR/books; books
        without a file are reported not found."""
        started = time.monotonic()
        chosen = self.mirror.fetch_first({book_id: candidate_paths(book_id) for book_id in book_ids})
        seconds = round(time.monotonic() - started, 3)
        for book_id in sorted(book_ids):
            path = chosen.get(book_id)
            if path is None:
                report.not_found.append({"book_id": book_id, "url": self.mirror.url + candidate_paths(book_id)[0]})
                continue
            staged, target = self.mirror.staged(path), raw_book_url(raw_dir, book_id)
            size = staged.stat().st_size
            try:
                _place(staged, target)
            except OSError as err:
                report.failed.append({"book_id": book_id, "url": self.mirror.url + path,
                                      "reason": f"writing {target}: {err}", "attempts": 1})
                continue
            report.downloaded.append({"book_id": book_id, "file": path, "bytes": size, "seconds": seconds,
                                      "attempts": 1})
            report.bytes_downloaded += size


def _place(staged: Path, target: str) -> None:
    """Move a complete staged file to its RAW_DIR path: a rename within a filesystem (atomic),
    else an atomic write of its bytes."""
    if storage.is_local(target):
        path = storage.filesystem(target)[1]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            os.replace(staged, path)
            return
        except OSError:
            pass  # another filesystem: write it below
    storage.write_bytes_atomic(target, staged.read_bytes())
    staged.unlink()


def _books_present(raw_dir: str) -> set[str]:
    """File names in RAW_DIR/books: one listing instead of one existence check per book."""
    fs, path = storage.filesystem(storage.join(raw_dir, "books"))
    # Other array tasks write here too; never trust a listing cached earlier in this process.
    fs.invalidate_cache(path)
    try:
        return {name.rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(path, detail=False)}
    except FileNotFoundError:
        return set()


def _download_book(mirror: Mirror, raw_dir: str, book_id: int) -> tuple[str, dict]:
    """Runs in a worker thread: (report list name, entry), so one bad book never stops the rest."""
    url = mirror.url(mirror_book_path(book_id))
    try:
        fetched = mirror.fetch(mirror_book_path(book_id))
    except NotOnMirror:
        return "not_found", {"book_id": book_id, "url": url}
    except FetchError as err:
        return "failed", {"book_id": book_id, "url": url, "reason": err.reason, "attempts": err.attempts}
    target = raw_book_url(raw_dir, book_id)
    try:
        storage.write_bytes_atomic(target, fetched.data)
    except OSError as err:
        reason = f"writing {target}: {err}"
        return "failed", {"book_id": book_id, "url": url, "reason": reason, "attempts": fetched.attempts}
    return "downloaded", {
        "book_id": book_id, "file": mirror_book_path(book_id), "bytes": len(fetched.data), "seconds": fetched.seconds,
        "attempts": fetched.attempts,
    }


def _book_ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated book numbers, got {text!r}") from err


def register(data_subparsers: argparse._SubParsersAction) -> None:
    """Add `download` to the `gptrain data` command group."""
    parser = data_subparsers.add_parser(
        "download",
        help="download Project Gutenberg plain-text books into RAW_DIR",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--mirror", default=DownloadConfig.mirror,
                        help="rsync://HOST[:PORT]/MODULE or HOST::MODULE (the way for more than a few books, e.g. "
                        f"{SUGGESTED_MIRROR}), a folder or fsspec URL laid out like gutenberg.org, or an http(s) "
                        "URL (default: %(default)s, for small selections)")
    parser.add_argument("--catalog", metavar="PATH_OR_URL",
                        help="pg_catalog.csv from elsewhere, for a mirror without one (PG's rsync collection)")
    parser.add_argument("--out", required=True, metavar="RAW_DIR", help="output folder or fsspec URL (s3://...)")
    parser.add_argument("--languages", default="en",
                        help="comma-separated language codes; a book is kept if any of its languages is listed "
                        "(default: %(default)s)")
    parser.add_argument("--types", default=TEXT_TYPE,
                        help="comma-separated catalog Types to keep (default: %(default)s; not Sound)")
    parser.add_argument("--subject", action="append", default=[], metavar="SUBSTRING",
                        help="keep books whose Subjects contain this (ignoring case); repeat for any of several")
    parser.add_argument("--bookshelf", action="append", default=[], metavar="SUBSTRING",
                        help="keep books whose Bookshelves contain this (ignoring case); repeat for any of several")
    parser.add_argument("--id-range", action="append", default=[], metavar="FIRST-LAST",
                        help="keep books with ids in this inclusive range; repeat for several")
    parser.add_argument("--limit", type=int, help="only the first N selected books, by book id")
    parser.add_argument("--ids", type=_book_ids, help="only these books (comma-separated ids)")
    parser.add_argument("--task-index", type=int,
                        help="this task's index in a job array "
                        "(default: SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX)")
    parser.add_argument("--num-tasks", type=int,
                        help="tasks in the job array (default: GPTRAIN_NUM_TASKS, or a whole Slurm array's count)")
    parser.add_argument("--concurrency", type=int, default=DownloadConfig.concurrency,
                        help="requests in flight; over http(s), for the whole job array (default: %(default)s)")
    parser.add_argument("--rate", type=float,
                        help="requests per second, 0 = no limit; over http(s), for the whole job array: each of n "
                        f"tasks starts rate/n (default: {POLITE_HTTP_RATE:g} for http(s) mirrors, no limit for "
                        "folders and other URLs)")
    parser.add_argument("--bwlimit", type=int, metavar="KIB_PER_S", help="rsync mirrors: bandwidth limit")
    parser.add_argument("--retries", type=int, default=DownloadConfig.retries,
                        help="retries after a timeout, connection error, 5xx or 429 (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=DownloadConfig.timeout,
                        help="seconds to wait for a connection or data (default: %(default)s)")
    parser.add_argument("--backoff", type=float, default=DownloadConfig.backoff,
                        help="first retry delay in seconds, doubled per retry, with jitter (default: %(default)s)")
    parser.set_defaults(func=run_download)


def run_download(args: argparse.Namespace) -> int:
    config = DownloadConfig(
        out=args.out,
        mirror=args.mirror,
        languages=parse_languages(args.languages),
        types=tuple(t.strip() for t in args.types.split(",") if t.strip()),
        subjects=tuple(args.subject),
        bookshelves=tuple(args.bookshelf),
        id_ranges=tuple(parse_id_range(r) for r in args.id_range),
        limit=args.limit,
        ids=args.ids,
        task_index=args.task_index,
        num_tasks=args.num_tasks,
        concurrency=args.concurrency,
        rate=args.rate,
        catalog=args.catalog,
        bwlimit=args.bwlimit,
        retries=args.retries,
        timeout=args.timeout,
        backoff=args.backoff,
    )
    report = download(config)
    # 404s are a fact about the mirror, not a failure of this task; other failures are worth a rerun.
    return 1 if report.failed else 0
