"""Storage URLs: the one place that turns a folder path or fsspec URL into a filesystem.

Every file gptrain reads or writes outside the process (raw books, datasets, runs,
checkpoints) goes through here, so a local folder and `s3://bucket/prefix` behave the same.
S3 endpoint and credentials come from the standard AWS environment variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...), which s3fs/botocore read.

Transient faults (5xx, throttling, dropped connections, timeouts) are retried by botocore
itself, on every S3 call of the process (gptrain's own, s3fs's and torch.distributed.checkpoint's
through fsspec), in its "standard" retry mode: exponential backoff with full jitter, at most
20 s a wait, for S3_MAX_ATTEMPTS attempts, about 2.5 minutes in all on average (the
variables AWS_MAX_ATTEMPTS and AWS_RETRY_MODE override both). So an outage of a minute
costs a run nothing; one that outlasts the retries becomes a StorageError
(`storage_fault`): one line naming the URL and the error, exit status 1. A full disk is one
too, named as such with the path.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import posixpath
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import fsspec
from fsspec.core import url_to_fs

from gptrain.errors import GptrainError, StorageError

# With full jitter each wait is uniform in [0, min(20 s, 2^attempt s)]: 20 attempts wait about
# 150 s on average and less than a minute with a probability below 1e-5.
S3_MAX_ATTEMPTS = 20


def _configure_s3_retries() -> None:
    """botocore's retry settings as the default of every S3FileSystem this process creates
    (fsspec applies its config to each instantiation, DCP's included). Explicit settings win:
    fsspec config files/FSSPEC_S3_* variables, and AWS_MAX_ATTEMPTS/AWS_RETRY_MODE (botocore
    reads those itself when the setting is left out here)."""
    s3 = fsspec.config.conf.setdefault("s3", {})
    config_kwargs = dict(s3.get("config_kwargs") or {})
    retries = {"mode": os.environ.get("AWS_RETRY_MODE", "standard")}
    if "AWS_MAX_ATTEMPTS" not in os.environ:
        retries["total_max_attempts"] = S3_MAX_ATTEMPTS
    config_kwargs.setdefault("retries", retries)
    s3["config_kwargs"] = config_kwargs


_configure_s3_retries()


def filesystem(url: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (filesystem, path inside it) for a local path or any fsspec URL."""
    return url_to_fs(str(url), **storage_options)


def is_local(url: str) -> bool:
    fs, _ = filesystem(url)
    return "file" in _protocols(fs)


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or local path (always with '/')."""
    url = str(url)
    if "://" in url:
        return posixpath.join(url, *parts)
    return os.path.join(url, *parts)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def is_dir(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.isdir(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def read_json(url: str) -> Any:
    try:
        return json.loads(read_bytes(url))
    except json.JSONDecodeError as err:
        raise ValueError(f"{url}: not valid JSON ({err})") from err


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write a file so that readers see either the old content or all of the new one."""
    write_file_atomic(url, lambda f: f.write(data))


def write_file_atomic(url: str, write: Callable[[BinaryIO], Any]) -> None:
    """Create a file by calling `write(file)`, so that readers see either the old content or
    all of the new one; `write` may stream a file larger than memory.

    Local: write a temporary sibling, fsync, then rename over the target (rename is atomic
    on POSIX). Object stores: an upload only becomes visible once complete, so it is
    atomic already.
    """
    fs, path = filesystem(url)
    if "file" not in _protocols(fs):
        with fs.open(path, "wb") as f:
            write(f)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(url: str, obj: Any) -> None:
    write_bytes_atomic(url, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def ensure_folder(url: str, key: str) -> None:
    """Create the folder `url` (the value of config key `key`) if it is missing; a clear error
    when it cannot be one: a file is in the way, or the bucket of an s3:// URL does not exist."""
    fs, path = filesystem(url)
    if "file" in _protocols(fs):
        if os.path.exists(path) and not os.path.isdir(path):
            raise GptrainError(f"{key}={url!r} is a file, not a folder")
        try:
            os.makedirs(path, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as err:  # a parent is a file
            raise GptrainError(f"{key}={url!r}: cannot create the folder ({err.strerror}: {err.filename})") from err
        except PermissionError as err:
            raise GptrainError(f"{key}={url!r}: permission denied creating {err.filename}") from err
        return
    bucket = path.split("/", 1)[0]
    with faults_named(url):
        if hasattr(fs, "call_s3"):  # s3fs: a missing bucket is a 404 (fs.exists would hide a fault too)
            try:
                fs.call_s3("head_bucket", Bucket=bucket)
            except OSError as err:
                if not isinstance(err, FileNotFoundError) and _http_status(err) != 404:
                    raise
                raise GptrainError(f"{key}={url!r}: bucket {bucket!r} does not exist at {_endpoint(fs)}") from None
        fs.invalidate_cache(path)
        if fs.isfile(path):
            raise GptrainError(f"{key}={url!r} is a file, not a folder")


def _http_status(err: BaseException) -> int | None:
    response = getattr(err.__cause__, "response", None) or {}
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _endpoint(fs: fsspec.AbstractFileSystem) -> str:
    return getattr(fs, "endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL") or "the default S3 endpoint"


def storage_fault(err: BaseException, url: str) -> StorageError | None:
    """`err` as a one-line StorageError naming `url`, when it is a storage fault: a full disk
    (ENOSPC/EDQUOT), or a server error, throttling, timeout or dropped connection that
    outlasted botocore's retries. None for anything else (a missing file, bad input, a bug)."""
    for cause in _causes(err):
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            where = cause.filename or url
            return StorageError(f"no space left on device: {where} ({os.strerror(cause.errno)})")
        if _is_transient(cause):
            message = " ".join(str(cause).split()) or type(cause).__name__
            return StorageError(f"{url}: {type(cause).__name__}: {message}")
    return None


@contextlib.contextmanager
def faults_named(url: str) -> Iterator[None]:
    """Turn a storage fault raised inside the block into a StorageError naming `url`."""
    try:
        yield
    except StorageError:
        raise
    except BaseException as err:
        fault = storage_fault(err, url)
        if fault is None:
            raise
        raise fault from err


def _causes(err: BaseException) -> Iterator[BaseException]:
    """`err`, its causes and contexts, and the per-rank errors inside a DCP CheckpointException."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__]
        failures = getattr(current, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
        if isinstance(failures, dict):
            todo += [pair[0] for pair in failures.values() if isinstance(pair, tuple) and pair]


_THROTTLING_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                     "TooManyRequestsException", "RequestTimeout", "RequestTimeoutException"}


def _is_transient(err: BaseException) -> bool:
    """An error that retrying may cure, raised once the libraries' own retries gave up."""
    if isinstance(err, (TimeoutError, ConnectionError)):  # builtins; aiohttp/asyncio timeouts subclass them
        return True
    # Only modules already imported can have raised their errors: no import cost otherwise.
    if "botocore" in sys.modules:
        from botocore.exceptions import BotoCoreError, ClientError, ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        if isinstance(err, (BotoConnectionError, HTTPClientError)):
            return True
        if isinstance(err, ClientError):
            response = err.response or {}
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return status >= 500 or response.get("Error", {}).get("Code") in _THROTTLING_CODES
        if isinstance(err, BotoCoreError):
            return False
    if "aiohttp" in sys.modules:
        from aiohttp import ClientConnectionError, ClientPayloadError

        return isinstance(err, (ClientConnectionError, ClientPayloadError))
    return False


def sha256_of(url: str) -> str:
    """sha256 of a local file or fsspec URL, read in 8 MiB blocks so memory stays small."""
    fs, path = filesystem(url)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()
