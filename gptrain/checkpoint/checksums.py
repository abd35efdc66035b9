"""sha256 of a checkpoint's files, computed while torch.distributed.checkpoint writes them.

`ChecksummingWriter` is DCP's fsspec writer with one change: every file it writes (this
rank's shard; on the coordinator also `.metadata`) goes through a stream that hashes the
bytes on their way out, so the digests cost no second read of what was just written. Each
rank knows the digests of the files it wrote; the checkpointer gathers them on rank 0 for
the commit marker (gptrain.checkpoint.commit), which hashes after the fact only the files DCP
did not write (config.yaml, the tokenizer spec).

The stream also keeps the first OSError the file system raised: torch.save turns a failed
write into "RuntimeError: [enforce fail at inline_container.cc] unexpected pos", losing
the errno, and `write_error` lets the checkpointer say "no space left on device" instead.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecWriter

from gptrain import storage
from gptrain.checkpoint.commit import FileRecord


class _HashingStream:
    """A write-only stream over `raw` that hashes what is written and remembers an OSError."""

    def __init__(self, raw: io.IOBase, on_error):
        self.raw, self.on_error = raw, on_error
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        written = self._noting_errors(self.raw.write, view)
        written = len(view) if written is None else written
        self.digest.update(view[:written])
        self.size += written
        return written

    def tell(self) -> int:
        return self.raw.tell()

    def flush(self) -> None:
        self._noting_errors(self.raw.flush)

    def fileno(self) -> int:  # DCP fsyncs it (without one it would sync the whole machine)
        return self.raw.fileno()

    def close(self) -> None:
        self._noting_errors(self.raw.close)

    def _noting_errors(self, call, *args):
        try:
            return call(*args)
        except OSError as err:
            self.on_error(err)
            raise

    def writable(self) -> bool:
        return True


class _HashingFileSystem(FileSystem):
    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, FileRecord] = {}  # path as DCP names it -> what was written
        self.write_error: OSError | None = None
        self._lock = threading.Lock()  # DCP may write several files from several threads

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with super().create_stream(path, mode) as raw:
            stream = _HashingStream(raw, lambda err: self._record_error(err, path))
            yield stream
        with self._lock:
            self.records[os.fspath(path)] = FileRecord(stream.size, stream.digest.hexdigest())

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        try:
            super().rename(path, new_path)
        except OSError as err:
            self._record_error(err, new_path)
            raise
        with self._lock:  # DCP writes `.metadata.tmp` and renames it
            if os.fspath(path) in self.records:
                self.records[os.fspath(new_path)] = self.records.pop(os.fspath(path))

    def _record_error(self, err: OSError, path: str | os.PathLike) -> None:
        """Keep the first error, with the file it concerns (a failed buffered write names none)."""
        with self._lock:
            if self.write_error is None:
                self.write_error = OSError(err.errno, err.strerror, err.filename or os.fspath(path))


class ChecksummingWriter(FsspecWriter):
    """FsspecWriter(url) that records the size and sha256 of every file it writes."""

    def __init__(self, url: str):
        # fsync local files (a commit must survive a power loss); an object is durable once
        # its upload returns, and without a file number DCP would sync the whole machine.
        super().__init__(url, sync_files=storage.is_local(url))
        self.fs = _HashingFileSystem()
        self.path = self.fs.init_path(url)
        self.url = url

    @property
    def records(self) -> dict[str, FileRecord]:
        """File name inside the checkpoint folder -> size and sha256, for the files written."""
        root = os.fspath(self.path).rstrip("/") + "/"
        return {path[len(root):]: record for path, record in self.fs.records.items() if path.startswith(root)}

    @property
    def write_error(self) -> OSError | None:
        """The first OSError a write, flush, close or rename of this writer raised."""
        return self.fs.write_error
