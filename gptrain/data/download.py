"""`gptrain data download`: fetch Project Gutenberg plain-text books into RAW_DIR.

The mirror is gutenberg.org (default), another http(s) mirror, a local folder or any fsspec
URL laid out like gutenberg.org: `cache/epub/feeds/pg_catalog.csv` and
`cache/epub/<id>/pg<id>.txt`. RAW_DIR (a folder or fsspec URL) receives:

    RAW_DIR/catalog.csv                           the catalog as served (prepare reads languages)
    RAW_DIR/books/pg<id>.txt                      each book's bytes exactly as served
    RAW_DIR/reports/download-<i>-of-<n>.json      what task i of n downloaded, skipped, missed

Books are written atomically (temporary file, then rename), so a book that exists is
complete and a rerun skips it. Job-array tasks split the selected books by id, so any number
of tasks can run at once on the same RAW_DIR without coordination.
"""

from __future__ import annotations

import argparse
import email.utils
import http.client
import logging
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from gptrain import __version__, storage
from gptrain.array_task import resolve_array_task
from gptrain.data.catalog import CATALOG_PATH, CatalogEntry, parse_catalog, parse_languages, select_books
from gptrain.errors import GptrainError
from gptrain.progress import Progress

log = logging.getLogger("gptrain")

DEFAULT_MIRROR = "https://www.gutenberg.org/"
# Requests per second to an http(s) mirror unless --rate says otherwise: gentle on a shared
# volunteer-run server. Folders and object stores are ours, so they get no limit by default.
POLITE_HTTP_RATE = 2.0
USER_AGENT = f"gptrain/{__version__} (Project Gutenberg text downloader for language-model pretraining)"
# A longer Retry-After is cut to this, so that one answer cannot park a worker for hours.
MAX_RETRY_AFTER_S = 600.0
MAX_BACKOFF_S = 120.0


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
    limit: int | None = None  # the first N selected books by id (before the array split)
    ids: tuple[int, ...] | None = None  # only these books
    task_index: int | None = None  # None: from SLURM_ARRAY_TASK_ID / JOB_COMPLETION_INDEX
    num_tasks: int | None = None  # None: GPTRAIN_NUM_TASKS, or a whole Slurm array's count
    concurrency: int = 4  # requests in flight at once
    rate: float | None = None  # requests started per second by this task, retries included; 0 = no limit
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


class NotOnMirror(Exception):
    """The mirror answered that the file does not exist (HTTP 404/410, missing file)."""


class FetchError(Exception):
    """One attempt failed; `transient` failures (timeouts, 5xx, 429, resets) are retried."""

    def __init__(self, reason: str, transient: bool, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.transient, self.retry_after = reason, transient, retry_after
        self.attempts = 1  # set by Mirror.fetch to the attempts spent when it gives up


class RateLimiter:
    """Spaces request starts at least 1/rate seconds apart across all worker threads."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._next_start = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_start)
            self._next_start = start + self.interval
        time.sleep(start - now)


@dataclass(frozen=True)
class Fetched:
    data: bytes
    attempts: int
    seconds: float  # duration of the attempt that succeeded (not rate-limit waits or backoff)


class Mirror:
    """Reads files from a mirror base with a polite rate limit and retries with backoff.

    http(s) mirrors go through urllib (we control the User-Agent, timeouts and which
    status codes are retried); local folders and other fsspec URLs through storage.
    """

    def __init__(self, base: str, config: DownloadConfig):
        self.base = base
        self.config = config
        self.is_http = urllib.parse.urlsplit(base).scheme in ("http", "https")
        default_rate = POLITE_HTTP_RATE if self.is_http else 0.0
        self.limiter = RateLimiter(default_rate if config.rate is None else config.rate)
        if not self.is_http:
            try:
                self.fs, self.root = storage.filesystem(base)
            except (ValueError, ImportError) as err:
                raise GptrainError(f"--mirror {base}: not a folder, http(s) or fsspec URL ({err})") from err

    def url(self, path: str) -> str:
        return storage.join(self.base, path)

    def fetch(self, path: str) -> Fetched:
        """Read `path` under the base. Raises NotOnMirror, or FetchError once retries are spent."""
        url = self.url(path)
        attempt = 1
        while True:
            self.limiter.wait()
            started = time.monotonic()
            try:
                data = self._read_http(url) if self.is_http else self._read_fsspec(path)
                return Fetched(data, attempt, round(time.monotonic() - started, 3))
            except FetchError as err:
                if not err.transient or attempt > self.config.retries:
                    err.attempts = attempt
                    raise
                delay = err.retry_after if err.retry_after is not None else self._backoff(attempt)
                log.info("download: %s: %s; retry %d of %d in %.1fs", url, err.reason, attempt,
                         self.config.retries, delay)
                time.sleep(delay)
                attempt += 1

    def _backoff(self, attempt: int) -> float:
        # Jitter spreads out the retries of many workers (and array tasks) that failed together.
        return min(MAX_BACKOFF_S, self.config.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)

    def _read_http(self, url: str) -> bytes:
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            err.close()
            if err.code in (404, 410):
                raise NotOnMirror(url) from err
            transient = err.code == 429 or err.code >= 500
            retry_after = _retry_after_seconds(err.headers.get("Retry-After")) if transient else None
            raise FetchError(f"HTTP {err.code} {err.reason}", transient, retry_after) from err
        except (OSError, http.client.HTTPException) as err:
            # URLError (refused, DNS), TimeoutError, resets, IncompleteRead: all may pass.
            reason = err.reason if isinstance(err, urllib.error.URLError) else err
            raise FetchError(f"{type(err).__name__}: {reason}", transient=True) from err

    def _read_fsspec(self, path: str) -> bytes:
        try:
            return self.fs.cat_file(storage.join(self.root, path))
        except FileNotFoundError as err:
            raise NotOnMirror(self.url(path)) from err
        except OSError as err:
            raise FetchError(f"{type(err).__name__}: {err}", transient=True) from err


def _retry_after_seconds(value: str | None) -> float | None:
    """Retry-After is either delay seconds or an HTTP date (RFC 9110 section 10.2.3)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


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
    chosen = select_books(entries, config.languages)
    if config.ids is not None:
        by_id = {e.book_id: e for e in chosen}
        unknown = sorted(set(config.ids) - set(by_id))
        if unknown:
            raise GptrainError(
                f"--ids {','.join(map(str, unknown))}: not Text books in languages "
                f"{','.join(config.languages)} in {source} (see --languages)"
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
    mirror = Mirror(config.mirror, config)
    catalog_bytes, catalog_source = _fetch_catalog(mirror)
    chosen = choose_books(parse_catalog(catalog_bytes, catalog_source), config, catalog_source)
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
    pool = ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="download")
    try:
        futures = [pool.submit(_download_book, mirror, config.out, book_id) for book_id in todo]
        with Progress(total=len(todo), desc="download", unit="books") as progress:
            for future in as_completed(futures):
                outcome, entry = future.result()
                getattr(report, outcome).append(entry)
                report.bytes_downloaded += entry.get("bytes", 0)
                progress.update()
    finally:
        # On an error or Ctrl-C, drop the queued books instead of fetching all of them first.
        pool.shutdown(wait=True, cancel_futures=True)

    for outcomes in (report.downloaded, report.not_found, report.failed):
        outcomes.sort(key=lambda outcome: outcome["book_id"])
    report.elapsed_s = round(time.monotonic() - started, 3)
    storage.write_json_atomic(raw_report_url(config.out, task.index, task.count), asdict(report))
    log.info("download: %s; report: %s", report.summary(), raw_report_url(config.out, task.index, task.count))
    for failure in report.failed:
        log.warning("download: book %d failed: %s (%s)", failure["book_id"], failure["reason"], failure["url"])
    return report


def _fetch_catalog(mirror: Mirror) -> tuple[bytes, str]:
    url = mirror.url(CATALOG_PATH)
    try:
        data = mirror.fetch(CATALOG_PATH).data
    except NotOnMirror as err:
        raise GptrainError(f"{url}: no Project Gutenberg catalog there (is --mirror right?)") from err
    except FetchError as err:
        raise GptrainError(f"{url}: cannot read the catalog ({err.reason}; is --mirror right?)") from err
    return data, url


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
        "book_id": book_id, "bytes": len(fetched.data), "seconds": fetched.seconds, "attempts": fetched.attempts,
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
                        help="mirror base: http(s) URL, local folder or fsspec URL laid out like gutenberg.org "
                        "(default: %(default)s)")
    parser.add_argument("--out", required=True, metavar="RAW_DIR", help="output folder or fsspec URL (s3://...)")
    parser.add_argument("--languages", default="en",
                        help="comma-separated language codes; a book is kept if any of its languages is listed "
                        "(default: %(default)s)")
    parser.add_argument("--limit", type=int, help="only the first N selected books, by book id")
    parser.add_argument("--ids", type=_book_ids, help="only these books (comma-separated ids)")
    parser.add_argument("--task-index", type=int,
                        help="this task's index in a job array "
                        "(default: SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX)")
    parser.add_argument("--num-tasks", type=int,
                        help="tasks in the job array (default: GPTRAIN_NUM_TASKS, or a whole Slurm array's count)")
    parser.add_argument("--concurrency", type=int, default=DownloadConfig.concurrency,
                        help="requests in flight (default: %(default)s)")
    parser.add_argument("--rate", type=float,
                        help=f"requests per second started by this task, 0 = no limit (default: "
                        f"{POLITE_HTTP_RATE:g} for http(s) mirrors, no limit for folders and other URLs)")
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
        limit=args.limit,
        ids=args.ids,
        task_index=args.task_index,
        num_tasks=args.num_tasks,
        concurrency=args.concurrency,
        rate=args.rate,
        retries=args.retries,
        timeout=args.timeout,
        backoff=args.backoff,
    )
    report = download(config)
    # 404s are a fact about the mirror, not a failure of this task; other failures are worth a rerun.
    return 1 if report.failed else 0
