"""Storage URLs: the one place that turns a folder path or fsspec URL into a filesystem.

Every file gptrain reads or writes outside the process (raw books, datasets, runs,
checkpoints) goes through here, so a local folder and `s3://bucket/prefix` behave the same.
S3 endpoint and credentials come from the standard AWS environment variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...), which s3fs/botocore read.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid
from collections.abc import Callable
from typing import Any, BinaryIO

import fsspec
from fsspec.core import url_to_fs


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


def sha256_of(url: str) -> str:
    """sha256 of a local file or fsspec URL, read in 8 MiB blocks so memory stays small."""
    fs, path = filesystem(url)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()
