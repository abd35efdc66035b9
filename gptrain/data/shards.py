"""Token shard files: a 32-byte header, then the tokens as little-endian unsigned integers.

    offset  size  field
    0       8     magic  b"GPTRTOKS"
    8       4     format version (uint32, currently 1)
    12      4     bytes per token (uint32: 2 = uint16, 4 = uint32)
    16      8     token count (uint64)
    24      8     zero padding, so the tokens start 32-byte aligned when memory-mapped

A shard is written under a temporary name and renamed (or uploaded whole to object
storage), so a file with a shard's name is always complete; its sha256 in the manifest
catches anything that changed it afterwards.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
import uuid
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from gptrain import storage
from gptrain.errors import GptrainError

MAGIC = b"GPTRTOKS"
VERSION = 1
HEADER = struct.Struct("<8sIIQ8x")
HEADER_SIZE = HEADER.size  # 32
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def token_dtype(n_vocab: int) -> np.dtype:
    """uint16 when every token id fits (GPT-2: 50257), else uint32."""
    return _DTYPES[2] if n_vocab <= 1 << 16 else _DTYPES[4]


@dataclass(frozen=True)
class ShardHeader:
    dtype: np.dtype
    num_tokens: int


def parse_header(data: bytes, name: str) -> ShardHeader:
    """Check the header of file `name` (its first HEADER_SIZE bytes)."""
    if len(data) < HEADER_SIZE:
        raise GptrainError(f"{name}: not a gptrain token shard (only {len(data)} bytes)")
    magic, version, itemsize, num_tokens = HEADER.unpack(data[:HEADER_SIZE])
    if magic != MAGIC:
        raise GptrainError(f"{name}: not a gptrain token shard (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise GptrainError(f"{name}: shard format version {version}, this gptrain reads version {VERSION}")
    if itemsize not in _DTYPES:
        raise GptrainError(f"{name}: shard has {itemsize}-byte tokens; only 2 or 4 are valid")
    return ShardHeader(dtype=_DTYPES[itemsize], num_tokens=num_tokens)


def open_tokens(path: str) -> np.ndarray:
    """Memory-map a local shard's tokens (read-only) after checking its header against its size."""
    with open(path, "rb") as f:
        header = parse_header(f.read(HEADER_SIZE), path)
        expected = HEADER_SIZE + header.num_tokens * header.dtype.itemsize
        actual = os.fstat(f.fileno()).st_size
        if actual != expected:
            raise GptrainError(
                f"{path}: shard is {actual} bytes but its header says {header.num_tokens} tokens ({expected} bytes)"
            )
        if header.num_tokens == 0:
            return np.zeros(0, dtype=header.dtype)  # mmap refuses empty maps
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    # Training reads small windows in random order: readahead would fetch far more from
    # disk (or a network filesystem) than a window needs.
    mapped.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapped, dtype=header.dtype, count=header.num_tokens, offset=HEADER_SIZE)


def verify_checksum(url: str, expected_sha256: str) -> None:
    try:
        actual = storage.sha256_of(url)
    except FileNotFoundError as err:
        raise GptrainError(f"{url}: shard listed in the manifest is missing") from err
    if actual != expected_sha256:
        raise GptrainError(
            f"{url}: shard is corrupt: sha256 {actual[:16]}... does not match the manifest's {expected_sha256[:16]}..."
        )


def default_cache_dir() -> str:
    return os.environ.get("GPTRAIN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "gptrain")


def local_copy(url: str, sha256: str, cache_dir: str | None = None, verify: bool = True) -> str:
    """A local path to shard `url`: the file itself when it is local, else a cached copy.

    Cached copies are named by their sha256 and only renamed into place after the
    checksum matched, so a file in the cache is known good (and shared between datasets).
    """
    if storage.is_local(url):
        path = storage.filesystem(url)[1]
        if verify:
            verify_checksum(path, sha256)
        return path
    cache = os.path.join(cache_dir or default_cache_dir(), "shards")
    cached = os.path.join(cache, f"{sha256}.bin")
    if os.path.exists(cached):
        return cached
    os.makedirs(cache, exist_ok=True)
    tmp = f"{cached}.tmp-{uuid.uuid4().hex[:8]}"
    fs, remote = storage.filesystem(url)
    try:
        try:
            fs.get_file(remote, tmp)
        except FileNotFoundError as err:
            raise GptrainError(f"{url}: shard listed in the manifest is missing") from err
        actual = storage.sha256_of(tmp)
        if actual != sha256:
            raise GptrainError(
                f"{url}: shard is corrupt: sha256 {actual[:16]}... does not match the manifest's {sha256[:16]}..."
            )
        os.replace(tmp, cached)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return cached


@dataclass(frozen=True)
class ShardRecord:
    """What the manifests say about one shard; `path` is relative to the dataset root."""

    path: str
    split: str
    tokens: int
    bytes: int
    sha256: str


class ShardWriter:
    """Cuts one split's token stream into shards of `shard_tokens` tokens (the last may be short).

    Shards hold a stretch of the stream, not whole documents: a document may continue in the
    next shard, and readers see the split as the concatenation of its shards. Tokens go to a
    local spool file as they come, so memory stays at one book whatever the shard size; a
    finished shard gets its token count in the header and moves into place whole (a rename
    in a local dataset, one upload to object storage), so a file with a shard's name is
    always complete.
    """

    def __init__(self, dataset: str, name_prefix: str, split: str, shard_tokens: int, dtype: np.dtype):
        self.dataset, self.name_prefix, self.split = dataset, name_prefix, split
        self.shard_tokens, self.dtype = shard_tokens, dtype
        self.num_tokens = 0  # tokens added so far: the next document's offset in the stream
        self.records: list[ShardRecord] = []
        self._spool: BinaryIO | None = None  # the shard being written
        self._spool_path = ""
        self._spool_tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        self.num_tokens += len(tokens)
        while len(tokens):
            if self._spool is None:
                self._open()
            take = min(len(tokens), self.shard_tokens - self._spool_tokens)
            self._spool.write(tokens[:take].data)
            self._spool_tokens += take
            tokens = tokens[take:]
            if self._spool_tokens == self.shard_tokens:
                self._finish()

    def close(self) -> list[ShardRecord]:
        if self._spool is not None:
            self._finish()
        return self.records

    def _path(self) -> str:
        return f"shards/{self.split}-{self.name_prefix}-{len(self.records):05d}.bin"

    def _open(self) -> None:
        target = storage.join(self.dataset, self._path())
        if storage.is_local(target):
            # Beside the target (one filesystem: the final rename is atomic); a killed task's
            # spool is one of its files, removed when it reruns.
            local = storage.filesystem(target)[1]
            os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
            self._spool_path = f"{local}.tmp-{uuid.uuid4().hex[:8]}"
        else:
            handle, self._spool_path = tempfile.mkstemp(prefix="gptrain-shard-", suffix=".bin")
            os.close(handle)
        self._spool = open(self._spool_path, "wb")
        self._spool.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, 0))  # the count comes at the end
        self._spool_tokens = 0

    def _finish(self) -> None:
        spool, self._spool = self._spool, None
        try:
            spool.seek(0)
            spool.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self._spool_tokens))
            spool.flush()
            os.fsync(spool.fileno())
        finally:
            spool.close()
        path = self._path()
        size, sha256 = os.path.getsize(self._spool_path), storage.sha256_of(self._spool_path)
        target = storage.join(self.dataset, path)
        try:
            if storage.is_local(target):
                os.replace(self._spool_path, storage.filesystem(target)[1])
            else:
                fs, remote = storage.filesystem(target)
                fs.put_file(self._spool_path, remote)
        finally:
            if os.path.exists(self._spool_path):
                os.remove(self._spool_path)
        self.records.append(ShardRecord(path, self.split, tokens=self._spool_tokens, bytes=size, sha256=sha256))
