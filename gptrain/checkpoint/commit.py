"""Checkpoint folders, commit markers, "latest", retention and cleanup.

Layout: RUN_DIR/checkpoints/step-<N>/ holds one checkpoint: the shards every rank wrote
(torch.distributed.checkpoint's `__<rank>_<n>.distcp` files and `.metadata`) and the run's
config.yaml. Rank 0 writes `commit.json` into the folder last, after every rank has finished
writing; it records the step, the time, the world size and every file with its size and
sha256 (computed while the file was written, see gptrain.checkpoint.checksums).

A folder without a readable marker is not a checkpoint: a save that was cut short (crash,
SIGKILL, node loss) leaves such a folder behind, it is never loaded, and the run's lease
holder removes it. Before a checkpoint is loaded its files are checked against the marker:
sizes catch a truncated or replaced file cheaply, checksums catch silent corruption (a
flipped bit, a bad disk or transfer); either names the file at fault and the checkpoint
counts as damaged. So does a marker whose step is not its folder's: retention and "latest"
go by that step, and a marker that lies about it must not make them delete or pick the wrong
checkpoint.
"""

from __future__ import annotations

import datetime
import logging
import posixpath
import re
import time
from dataclasses import dataclass

from gptrain import storage
from gptrain.errors import GptrainError

log = logging.getLogger("gptrain.checkpoint")

CHECKPOINTS_DIR = "checkpoints"
MARKER_FILE = "commit.json"
MARKER_FORMAT = "gptrain-checkpoint/2"
SIZES_ONLY_FORMAT = "gptrain-checkpoint/1"  # earlier markers: sizes, no checksums (still loaded)
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(GptrainError):
    """A checkpoint that cannot be used: uncommitted, damaged, or not from a compatible run."""


class NotCommittedError(CheckpointError):
    """A folder without a commit marker: its save never finished (or it is being deleted)."""


@dataclass(frozen=True)
class FileRecord:
    size: int  # bytes
    sha256: str | None  # None in markers written before checksums (SIZES_ONLY_FORMAT)


@dataclass(frozen=True)
class Commit:
    """What a commit marker records about one checkpoint."""

    url: str  # the checkpoint folder
    step: int
    time: float  # seconds since the epoch when it was committed
    world_size: int
    files: dict[str, FileRecord]  # file name inside the folder -> size and sha256

    @property
    def marker_url(self) -> str:
        return storage.join(self.url, MARKER_FILE)


def checkpoints_url(run_dir: str) -> str:
    return storage.join(run_dir, CHECKPOINTS_DIR)


def step_url(run_dir: str, step: int) -> str:
    return storage.join(checkpoints_url(run_dir), f"step-{step}")


def step_folders(run_dir: str) -> list[tuple[int, str]]:
    """(step, url) of every step-<N> folder under RUN_DIR/checkpoints, committed or not, by step."""
    fs, path = storage.filesystem(checkpoints_url(run_dir))
    # Object-store filesystems cache listings; other processes (ranks, earlier runs) write here.
    fs.invalidate_cache(path)
    if not fs.isdir(path):
        return []
    folders = []
    for entry in fs.ls(path, detail=True):
        name = posixpath.basename(entry["name"].rstrip("/"))
        match = _STEP_DIR.match(name)
        if match and entry["type"] == "directory":
            folders.append((int(match.group(1)), storage.join(checkpoints_url(run_dir), name)))
    return sorted(folders)


def list_files(url: str) -> dict[str, int]:
    """Every file under a checkpoint folder (relative name -> size), the marker excluded."""
    fs, path = storage.filesystem(url)
    fs.invalidate_cache(path)
    root = path.rstrip("/") + "/"
    found = fs.find(path, detail=True)
    return {
        name[len(root):]: int(info["size"])
        for name, info in found.items()
        if info["type"] == "file" and name[len(root):] != MARKER_FILE
    }


def write_commit(url: str, step: int, world_size: int, written: dict[str, FileRecord]) -> Commit:
    """Mark a fully written checkpoint as committed. Call on rank 0 only, after every rank has
    finished writing its files (the marker must never name a file still being written), with
    the records of the files the ranks wrote (`written`, name -> size and sha256); the other
    files of the folder are hashed here."""
    present = list_files(url)
    missing = sorted(set(written) - set(present))
    if missing:
        raise CheckpointError(f"{url}: {', '.join(missing)} written but not found on storage")
    files = {}
    for name, size in sorted(present.items()):
        record = written.get(name)
        if record is None:  # not written through DCP (config.yaml, the tokenizer spec): small
            record = FileRecord(size, storage.sha256_of(storage.join(url, name)))
        elif record.size != size:
            raise CheckpointError(f"{storage.join(url, name)}: {size} bytes on storage, {record.size} written")
        files[name] = record
    commit = Commit(url=url, step=step, time=time.time(), world_size=world_size, files=files)
    stamp = datetime.datetime.fromtimestamp(commit.time, datetime.timezone.utc).isoformat(timespec="seconds")
    storage.write_json_atomic(commit.marker_url, {
        "format": MARKER_FORMAT,
        "step": step,
        "time": commit.time,
        "committed_at": stamp,
        "world_size": world_size,
        "files": {name: {"size": r.size, "sha256": r.sha256} for name, r in files.items()},
    })
    return commit


def read_commit(url: str) -> Commit:
    """The commit marker of a checkpoint folder; an error naming the marker if it is missing
    (NotCommittedError: the save never finished), unreadable, or names another step than
    its step-<N> folder."""
    marker = storage.join(url, MARKER_FILE)
    fs, path = storage.filesystem(marker)
    fs.invalidate_cache(posixpath.dirname(path))
    try:
        data = storage.read_json(marker)
    except FileNotFoundError:
        raise NotCommittedError(f"{marker} is missing: {url} was never committed (its save did not finish)") from None
    except ValueError as err:  # not JSON
        raise CheckpointError(f"{marker} is not a valid commit marker: {err}") from err
    try:
        if data.get("format") not in (MARKER_FORMAT, SIZES_ONLY_FORMAT):
            raise ValueError(f"format {data.get('format')!r}, expected {MARKER_FORMAT!r}")
        if data["format"] == SIZES_ONLY_FORMAT:
            files = {str(name): FileRecord(int(size), None) for name, size in data["files"].items()}
        else:
            files = {str(name): FileRecord(int(entry["size"]), str(entry["sha256"]))
                     for name, entry in data["files"].items()}
        commit = Commit(url=url, step=int(data["step"]), time=float(data["time"]),
                        world_size=int(data["world_size"]), files=files)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{marker} is not a valid commit marker: {err}") from err
    folder = _STEP_DIR.match(posixpath.basename(url.rstrip("/")))
    if folder and int(folder.group(1)) != commit.step:
        raise CheckpointError(f"{marker} says step {commit.step} in folder step-{folder.group(1)}: "
                              "the marker is damaged")
    return commit


def verify(commit: Commit, checksums: bool = True) -> None:
    """Check that every file the marker lists is there with its recorded size and, with
    `checksums`, its sha256 (which reads every byte)."""
    verify_sizes(commit)
    if checksums:
        verify_checksums(commit)


def verify_sizes(commit: Commit) -> None:
    """Every file the marker lists is there with its recorded size: one listing, no reads."""
    present = list_files(commit.url)
    for name, record in sorted(commit.files.items()):
        file_url = storage.join(commit.url, name)
        if name not in present:
            raise CheckpointError(f"{file_url} is missing (listed in {commit.marker_url})")
        if present[name] != record.size:
            raise CheckpointError(
                f"{file_url} has {present[name]} bytes but {commit.marker_url} recorded {record.size}: "
                "the file is truncated or damaged"
            )


def verify_checksums(commit: Commit, rank: int = 0, world_size: int = 1) -> None:
    """The sha256 of the files rank `rank` of `world_size` checks (`share`: the ranks split the
    reading) against the marker. Markers from before checksums have none to check."""
    for name in share(commit.files, rank, world_size):
        expected = commit.files[name].sha256
        if expected is None:
            continue
        actual = storage.sha256_of(storage.join(commit.url, name))
        if actual != expected:
            raise CheckpointError(
                f"{storage.join(commit.url, name)} has sha256 {actual[:16]}... but {commit.marker_url} recorded "
                f"{expected[:16]}...: the file is damaged"
            )


def share(files: dict[str, FileRecord], rank: int, world_size: int) -> list[str]:
    """The files rank `rank` hashes: largest first, each to the rank with the fewest bytes so far."""
    loads = [0] * world_size
    mine = []
    for name, record in sorted(files.items(), key=lambda item: (-item[1].size, item[0])):
        least = loads.index(min(loads))
        loads[least] += record.size
        if least == rank:
            mine.append(name)
    return mine


def committed(run_dir: str) -> list[Commit]:
    """The run's committed checkpoints, oldest first. A folder with a damaged marker is listed
    as a warning and skipped; folders without a marker are not checkpoints."""
    return _scan(run_dir)[0]


def _scan(run_dir: str) -> tuple[list[Commit], list[tuple[int, str]]]:
    """One listing of RUN_DIR/checkpoints: (committed checkpoints oldest first, (step, url) of the
    step folders without a marker: saves that did not finish, or folders deleted while we looked)."""
    commits, uncommitted = [], []
    for step, url in step_folders(run_dir):
        try:
            commits.append(read_commit(url))
        except NotCommittedError:
            uncommitted.append((step, url))
        except CheckpointError as err:
            log.warning("ignoring %s: %s", url, err)
    return commits, uncommitted


def candidates(url: str) -> list[str]:
    """Checkpoint folders that `url` names, newest first: the folder itself, or the committed
    checkpoints of a run directory (one that has a checkpoints/ folder)."""
    if storage.exists(checkpoints_url(url)):
        return [commit.url for commit in reversed(committed(url))]
    return [url]


def remove_checkpoint(url: str) -> None:
    """Delete a checkpoint folder. The marker goes first, so a deletion cut short leaves an
    uncommitted folder (ignored, cleaned later), never a committed one with files missing."""
    fs, path = storage.filesystem(url)
    marker = posixpath.join(path, MARKER_FILE)
    if fs.exists(marker):
        fs.rm(marker)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.invalidate_cache(path)


def remove_uncommitted(run_dir: str, below_step: int | None = None) -> list[str]:
    """Delete step folders without a marker (saves that never finished); with `below_step`,
    only those of earlier steps (a later one may be a save still in flight). Rank 0 only."""
    return _remove_uncommitted(_scan(run_dir)[1], below_step)


def _remove_uncommitted(uncommitted: list[tuple[int, str]], below_step: int | None) -> list[str]:
    removed = []
    for step, url in uncommitted:
        if below_step is None or step < below_step:
            remove_checkpoint(url)
            removed.append(url)
    if removed:
        log.info("removed %d uncommitted checkpoint folder(s): %s", len(removed), ", ".join(removed))
    return removed


def retained_steps(steps: list[int], keep_last: int, keep_every: int) -> set[int]:
    """Steps to keep: the newest `keep_last`, plus every multiple of `keep_every` (if > 0)."""
    keep = set(sorted(steps)[-keep_last:]) if keep_last > 0 else set()
    if keep_every > 0:
        keep.update(step for step in steps if step % keep_every == 0)
    return keep


def apply_retention(run_dir: str, keep_last: int, keep_every: int) -> list[str]:
    """Delete committed checkpoints that the retention policy does not keep. Rank 0 only."""
    return _remove_unretained(committed(run_dir), keep_last, keep_every)


def _remove_unretained(commits: list[Commit], keep_last: int, keep_every: int) -> list[str]:
    keep = retained_steps([c.step for c in commits], keep_last, keep_every)
    removed = []
    for commit in commits:
        if commit.step not in keep:
            remove_checkpoint(commit.url)
            removed.append(commit.url)
    return removed


def tidy_after_commit(run_dir: str, step: int, keep_last: int, keep_every: int) -> list[str]:
    """After committing `step`: delete the earlier saves that never finished and the committed
    checkpoints retention does not keep, from one listing (on object stores every listing and
    marker read is a request, paid on each save). Returns what retention removed. Rank 0 only."""
    commits, uncommitted = _scan(run_dir)
    _remove_uncommitted(uncommitted, below_step=step)
    return _remove_unretained(commits, keep_last, keep_every)
