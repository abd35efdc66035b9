"""One writer per run directory: RUN_DIR/lease.json, held by rank 0 of the run training there.

    with hold_run_lease(run_dir, timeout_s, env) as lease:  # refused while another run holds it
        ... lease.check() at step boundaries and before checkpoint commits and cleanups

The lease names its holder (a token unique to this acquisition, host, pid, job id, start
time) and carries a heartbeat that a background thread renews every timeout_s / 10 seconds.
A process that finds the lease held:

* by a process of this machine (same host, boot and pid namespace) that has ended: takes
  it over at once, with a warning (a crashed or killed run, rerun here);
* by a live process of this machine, or by one whose heartbeat advances while it watches:
  is refused, the message naming the holder;
* by a process elsewhere whose heartbeat does not advance: waits until timeout_s have passed
  since that heartbeat, then takes the lease over with a warning. A job requeued onto
  another node after its node died is thus never blocked, and two live runs never share a
  directory.

Every change of the lease is a compare-and-swap, so two processes racing for it cannot both
win: on a local or shared file system under a lock file (`filelock`, flock), on S3 with
conditional PUTs (If-None-Match / If-Match on the ETag). A renewal that finds another owner
means the lease was taken over (this process was paused or cut off for longer than the
timeout): `check()` then raises LeaseLostError and the run stops without writing more. A
renewal that fails for a storage fault (after botocore's retries) stops the run the same way
with that StorageError. The timeout (default 300 s) exceeds the renewal interval plus the
storage retry budget (gptrain.storage), so a holder always learns it failed to renew before
anyone may take over.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from gptrain import storage
from gptrain.distributed import DistEnv, broadcast_object
from gptrain.errors import GptrainError, StorageError

log = logging.getLogger("gptrain.checkpoint")

LEASE_FILE = "lease.json"
RENEWALS_PER_TIMEOUT = 10


class RunDirectoryBusyError(GptrainError):
    """Another live run holds the run directory's lease."""


class LeaseLostError(GptrainError):
    """Another process took the lease over while this run held it: this run must stop."""


def _this_machine() -> dict[str, Any]:
    """What tells a process of this machine apart: host, boot and pid namespace (containers
    sharing a host name have their own pid namespaces, where a pid means another process)."""
    machine: dict[str, Any] = {"host": socket.gethostname()}
    with contextlib.suppress(OSError):
        with open("/proc/sys/kernel/random/boot_id") as f:
            machine["boot_id"] = f.read().strip()
        machine["pid_namespace"] = os.stat("/proc/self/ns/pid").st_ino
    return machine


def _process_start(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks since boot), None if there is no such live
    process. With the pid it names one process: a pid can be reused, a start time cannot."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])  # a zombie has ended


def _job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")


def describe(record: dict[str, Any]) -> str:
    """The holder of a lease, for people."""
    job = f", job {record['job_id']}" if record.get("job_id") else ""
    age = time.time() - float(record.get("heartbeat", 0))
    return (f"pid {record.get('pid')} on {record.get('machine', {}).get('host', '?')}{job}, holding it since "
            f"{record.get('acquired_at', '?')}, last heartbeat {age:.0f} s ago")


class _LocalLeaseFile:
    """The lease on a local or shared file system: read-compare-write under a lock file."""

    def __init__(self, url: str):
        from filelock import FileLock

        self.path = url
        self.lock = FileLock(url + ".lock", timeout=60)

    def read(self) -> tuple[bytes | None, Any]:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None
        return data, data  # the content is its own version

    def write(self, data: bytes, expected: Any) -> Any:
        with self.lock:
            if self.read()[1] != expected:
                return None
            storage.write_bytes_atomic(self.path, data)
            return data

    def delete(self, expected: Any) -> None:
        with self.lock:
            if self.read()[1] == expected:
                os.remove(self.path)


class _ObjectLeaseFile:
    """The lease on S3: conditional PUTs on the object's ETag."""

    def __init__(self, url: str):
        self.fs, path = storage.filesystem(url)
        self.bucket, self.key = path.split("/", 1)

    def read(self) -> tuple[bytes | None, Any]:
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, str]:
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with response["Body"] as body:
                return await body.read(), response["ETag"]

        try:
            return sync(self.fs.loop, get)
        except FileNotFoundError:
            return None, None

    def write(self, data: bytes, expected: Any) -> Any:
        condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition)["ETag"]
        except OSError as err:  # s3fs's translation of 412 PreconditionFailed / 409 ConditionalRequestConflict
            if _http_status(err) in (409, 412):
                return None
            raise

    def delete(self, expected: Any) -> None:
        self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)


def _http_status(err: BaseException) -> int | None:
    response = getattr(err.__cause__, "response", None) or {}
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode")


class RunLease:
    """The lease of one run directory, as held (or not) by this process."""

    def __init__(self, run_dir: str, timeout_s: float):
        self.run_dir, self.timeout_s = run_dir, timeout_s
        self.url = storage.join(run_dir, LEASE_FILE)
        self.file = _LocalLeaseFile(self.url) if storage.is_local(run_dir) else _ObjectLeaseFile(self.url)
        self.owner = uuid.uuid4().hex
        self._record: dict[str, Any] | None = None
        self._version: Any = None
        self._renewed_at = 0.0  # time.monotonic() of the last renewal
        self._problem: BaseException | None = None  # set by the heartbeat thread
        self._lock = threading.Lock()  # renewals: the heartbeat thread's and check()'s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._record is not None

    # -----------------------------------------------------------------------------------------
    # Acquiring.

    def acquire(self) -> None:
        """Take the lease (see the module docstring), start the heartbeat thread."""
        with storage.faults_named(self.url):
            watched: tuple[bytes, float] | None = None  # a foreign lease and since when it is unchanged
            while not self.held:
                data, version = self.file.read()
                if data is None:
                    self._swap(None, self._fresh_record())
                    continue
                if watched is not None and watched[0] != data and _owner(watched[0]) == _owner(data):
                    raise self._busy(_parse(data), "its heartbeat advanced while this process waited")
                first_look = watched is None or watched[0] != data
                if first_look:
                    watched = (data, time.monotonic())
                reason, wait_s = self._takeover_reason(data, watched[1])
                if reason is not None:
                    log.warning("taking over the lease of %s: %s", self.run_dir, reason)
                    self._swap(version, self._fresh_record())
                    continue
                if first_look:
                    log.warning("%s is leased by %s; waiting up to %.0f s for its heartbeat",
                                self.run_dir, describe(_parse(data)), wait_s)
                time.sleep(min(1.0, self.timeout_s / RENEWALS_PER_TIMEOUT))
        log.info("holding the lease of %s (%s)", self.run_dir, LEASE_FILE)
        self._thread = threading.Thread(target=self._beat, name="gptrain-lease", daemon=True)
        self._thread.start()

    def _takeover_reason(self, data: bytes, unchanged_since: float) -> tuple[str | None, float]:
        """(why the lease `data` may be taken over now, None to wait; seconds left to wait).
        Raises RunDirectoryBusyError when its holder is a live process of this machine."""
        record = _parse(data)
        if record is None:
            return f"{self.url} is unreadable", 0.0
        if _same_machine(record.get("machine", {})):
            start = _process_start(int(record.get("pid", -1)))
            if start is None or start != record.get("process_start"):
                return f"its holder has ended ({describe(record)})", 0.0
            raise self._busy(record, "that process is running on this machine")
        timeout = float(record.get("timeout_s", self.timeout_s))
        # By the holder's clock, or by how long this process has seen no change (clock skew).
        silent = max(time.time() - float(record.get("heartbeat", 0)), time.monotonic() - unchanged_since)
        if silent >= timeout:
            return f"no heartbeat for {silent:.0f} s, more than its {timeout:g} s timeout ({describe(record)})", 0.0
        return None, timeout - silent

    def _busy(self, record: dict[str, Any], why: str) -> RunDirectoryBusyError:
        return RunDirectoryBusyError(
            f"train.run_dir={self.run_dir!r} is in use by another run: {describe(record)} ({why}). Wait for it to "
            f"end, stop it, or use another train.run_dir; a lease without a heartbeat for "
            f"{float(record.get('timeout_s', self.timeout_s)):g} s is taken over"
        )

    def _fresh_record(self) -> dict[str, Any]:
        now = time.time()
        return {
            "owner": self.owner, "pid": os.getpid(), "process_start": _process_start(os.getpid()),
            "machine": _this_machine(), "job_id": _job_id(), "acquired_at": _stamp(now),
            "heartbeat": now, "heartbeat_at": _stamp(now), "timeout_s": self.timeout_s,
        }

    def _swap(self, expected: Any, record: dict[str, Any]) -> bool:
        """Write `record` if the lease is still at version `expected` (None: absent). A write
        whose response was lost is retried by botocore and then meets its own precondition:
        the owner token tells that the lease is ours all the same."""
        version = self.file.write(_encode(record), expected)
        if version is None:
            data, current = self.file.read()
            if data is None or _owner(data) != self.owner:
                return False
            version = current
        self._record, self._version, self._renewed_at = record, version, time.monotonic()
        return True

    # -----------------------------------------------------------------------------------------
    # Holding.

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout_s / RENEWALS_PER_TIMEOUT):
            try:
                self._renew()
            except BaseException as err:  # a storage fault that outlasted the retries, or LeaseLostError
                self._problem = err
                return

    def _renew(self) -> None:
        with self._lock:
            now = time.time()
            record = {**self._record, "heartbeat": now, "heartbeat_at": _stamp(now)}
            with storage.faults_named(self.url):
                if self._swap(self._version, record):
                    return
                data, _ = self.file.read()
            holder = describe(_parse(data) or {}) if data else "nobody (the lease file was deleted)"
            raise LeaseLostError(f"lost the lease of {self.run_dir} while training: it is now held by {holder}; "
                                 "stopping so that only one run writes there")

    def check(self) -> None:
        """Raise if this process no longer holds the lease: taken over, or its renewal failed.
        Costs nothing while the heartbeat is on time; renews right here when it is overdue
        (a process that was paused learns at once whether its lease survived)."""
        if not self.held:
            return
        if self._problem is not None:
            raise self._problem
        if time.monotonic() - self._renewed_at > self.timeout_s / 2:
            self._renew()

    def abandon(self) -> None:
        """Stop renewing, without deleting: the lease goes stale on its own."""
        self._stop.set()

    def release(self) -> None:
        """Stop the heartbeat and delete the lease, if it is still ours."""
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            data, version = self.file.read()
            if data is not None and _owner(data) == self.owner:
                self.file.delete(version)
            self._record = None


@contextlib.contextmanager
def hold_run_lease(run_dir: str, timeout_s: float, env: DistEnv) -> Iterator[RunLease]:
    """Rank 0 holds the lease of `run_dir` for the duration of the block (other ranks get an
    unheld RunLease, whose check() does nothing). A refusal reaches every rank, so all stop
    the same way. Released at the end, unless the block failed for a storage fault: the
    release would wait out the same retries, and the lease goes stale on its own."""
    lease = RunLease(run_dir, timeout_s)
    error = None
    if env.is_main:
        try:
            storage.ensure_folder(run_dir, "train.run_dir")
            lease.acquire()
        except Exception as err:  # noqa: BLE001  (raised on every rank below)
            error = err
    raise_on_every_rank(error, env.is_main)
    try:
        yield lease
    except StorageError:
        lease.abandon()
        raise
    except BaseException:
        _release_quietly(lease)
        raise
    lease.release()


def raise_on_every_rank(error: BaseException | None, is_main: bool, group=None) -> None:
    """A collective: rank 0's error (None: it succeeded) raised on every rank, so that no rank
    waits forever for one that has stopped. Rank 0 raises its own; the others a copy of its
    kind and message (an exception's causes may not pickle). `group`: a CPU (gloo) group,
    or None for the default one."""
    message = None if error is None else (_error_kind(error), str(error))
    if group is None:
        message = broadcast_object(message)
    else:
        import torch.distributed as dist

        box = [message]
        dist.broadcast_object_list(box, src=0, group=group)
        message = box[0]
    if message is None:
        return
    if is_main:
        raise error
    kind, text = message
    raise {"input": GptrainError, "lease": LeaseLostError, "storage": StorageError}.get(kind, RuntimeError)(
        f"rank 0: {text}")


def _error_kind(error: BaseException) -> str:
    if isinstance(error, LeaseLostError):
        return "lease"
    if isinstance(error, GptrainError):
        return "input"
    return "storage" if isinstance(error, StorageError) else "crash"


def _release_quietly(lease: RunLease) -> None:
    """Release while another error is on its way out: that error is the one to report."""
    try:
        lease.release()
    except Exception as err:  # noqa: BLE001
        log.warning("could not release the lease of %s: %s", lease.run_dir, err)


def _same_machine(machine: dict[str, Any]) -> bool:
    here = _this_machine()
    return "boot_id" in here and all(machine.get(k) == here[k] for k in ("host", "boot_id", "pid_namespace"))


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(data)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "owner" in record else None


def _owner(data: bytes) -> str | None:
    record = _parse(data)
    return record["owner"] if record else None


def _encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def _stamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")
