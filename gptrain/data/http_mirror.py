"""Reading from an http(s) mirror, a folder or an fsspec URL: a polite rate, retries, backoff.

http(s) mirrors go through urllib (we control the User-Agent, timeouts and which status codes
are retried: timeouts, connection errors, 5xx and 429, honouring Retry-After); folders and
other fsspec URLs through storage. Over http(s), the rate and concurrency are the budget of a
whole job array: task i of n gets rate/n and concurrency//n (at least 1).
"""

from __future__ import annotations

import email.utils
import http.client
import logging
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone

from gptrain import __version__, storage
from gptrain.errors import GptrainError

log = logging.getLogger("gptrain")

# Requests per second to an http(s) mirror, for the whole job array, unless --rate says
# otherwise: gentle on a shared volunteer-run server. Folders and object stores are ours, so
# they get no limit by default.
POLITE_HTTP_RATE = 2.0
USER_AGENT = f"gptrain/{__version__} (Project Gutenberg text downloader for language-model pretraining)"
# A longer Retry-After is cut to this, so that one answer cannot park a worker for hours.
MAX_RETRY_AFTER_S = 600.0
MAX_BACKOFF_S = 120.0


@dataclass(frozen=True)
class HttpSettings:
    rate: float | None  # requests started per second by the whole array, retries included; 0 = no limit
    concurrency: int  # requests in flight: for the whole array over http(s), else per task
    retries: int  # further attempts after a timeout, connection error, 5xx or 429
    timeout: float  # seconds without progress on connect or read before giving up on an attempt
    backoff: float  # first retry delay in seconds; doubles per retry, with jitter


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

    def __init__(self, base: str, config: HttpSettings, num_tasks: int = 1):
        self.base = base
        self.config = config
        self.is_http = urllib.parse.urlsplit(base).scheme in ("http", "https")
        rate = (POLITE_HTTP_RATE if self.is_http else 0.0) if config.rate is None else config.rate
        # Over http(s), the rate and concurrency are the whole array's: each task gets its share.
        share = num_tasks if self.is_http else 1
        self.limiter = RateLimiter(rate / share)
        self.concurrency = max(1, config.concurrency // share)
        if not self.is_http:
            try:
                self.fs, self.root = storage.filesystem(base)
            except (ValueError, ImportError) as err:
                raise GptrainError(f"--mirror {base}: not a folder, http(s) or fsspec URL ({err})") from err

    def url(self, path: str) -> str:
        return storage.join(self.base, path)

    def catalog(self, path: str) -> tuple[bytes, str]:
        url = self.url(path)
        try:
            data = self.fetch(path).data
        except NotOnMirror as err:
            raise GptrainError(f"{url}: no Project Gutenberg catalog there (is --mirror right?)") from err
        except FetchError as err:
            raise GptrainError(f"{url}: cannot read the catalog ({err.reason}; is --mirror right?)") from err
        return data, url

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
