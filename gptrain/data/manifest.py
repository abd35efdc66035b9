"""Dataset layout, task manifests and the dataset manifest (`gptrain data finalize`).

    DATASET/shards/<split>-t<i>of<n>-<k>.bin   token shards written by task i of n
    DATASET/tasks/t<i>of<n>-minhash.npy        task i's MinHash signatures (with dedup on)
    DATASET/tasks/t<i>of<n>.json               task i's manifest: its done marker, written last
    DATASET/manifest.json                      the dataset's entry point, written by finalize

Each task owns its books (`ArrayTask.owns(book_id)`) and writes only its own files, so an
array's tasks never coordinate. A task's split stream is its books in id order, each followed
by `<|endoftext|>`. Finalize resolves duplicate editions over all tasks (dedup.py) and never
rewrites a shard: a split is the tasks' streams in task order without the dropped books,
listed as `segments` (shard, start, end) of the shards, and readers go through them, so a
dropped book contributes no token. Nothing here holds a timestamp, so rerunning a task or
finalize reproduces its files byte for byte.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import re
from dataclasses import asdict
from typing import Any

from gptrain import storage
from gptrain.array_task import ArrayTask
from gptrain.data.dedup import DedupOptions, Duplicate, load_sketches, resolve
from gptrain.data.shards import verify_checksum
from gptrain.errors import GptrainError
from gptrain.progress import Progress

FORMAT = "gptrain-dataset"
VERSION = 2  # 2: splits as segments of shards (dropped duplicates skipped), cleaning and dedup
SPLITS = ("train", "val")
MANIFEST = "manifest.json"
_TASK_MARKER = re.compile(r"t(\d+)of(\d+)\.json$")


def task_name(task: ArrayTask) -> str:
    return f"t{task.index}of{task.count}"


def task_marker_url(dataset: str, task: ArrayTask) -> str:
    return storage.join(dataset, "tasks", f"{task_name(task)}.json")


def signatures_path(task: ArrayTask) -> str:
    """Where task `task` keeps its MinHash signatures, relative to the dataset."""
    return f"tasks/{task_name(task)}-minhash.npy"


def manifest_url(dataset: str) -> str:
    return storage.join(dataset, MANIFEST)


def fingerprint(splits: dict[str, dict], tokenizer_spec: dict, params: dict) -> str:
    """Identifies the dataset's content and how it was made: the same tokens (each split's
    segments of shards, by checksum), tokenizer and settings give the same fingerprint."""
    streams = {
        name: [[split["shards"][i]["sha256"], start, end] for i, start, end in split["segments"]]
        for name, split in sorted(splits.items())
    }
    payload = {"splits": streams, "tokenizer": tokenizer_spec, "params": params}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def load_manifest(dataset: str) -> dict[str, Any]:
    url = manifest_url(dataset)
    if not storage.exists(url):
        raise GptrainError(f"{url}: no dataset manifest; run `gptrain data prepare` (and `gptrain data finalize`)")
    try:
        manifest = storage.read_json(url)
    except ValueError as err:
        raise GptrainError(str(err)) from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise GptrainError(f"{url}: not a gptrain dataset manifest (format is not {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise GptrainError(f"{url}: dataset version {manifest.get('version')}, this gptrain reads version {VERSION}")
    return manifest


def finished_tasks(dataset: str) -> dict[int, set[int]]:
    """{num_tasks: {indexes with a done marker}} over DATASET/tasks."""
    fs, root = storage.filesystem(storage.join(dataset, "tasks"))
    found: dict[int, set[int]] = {}
    for path in fs.glob(f"{root}/t*of*.json"):
        match = _TASK_MARKER.search(path)
        if match:
            found.setdefault(int(match[2]), set()).add(int(match[1]))
    return found


def finalize(dataset: str, num_tasks: int | None = None) -> dict[str, Any]:
    """Merge the task manifests into DATASET/manifest.json after checking every shard."""
    found = finished_tasks(dataset)
    if num_tasks is None:
        if len(found) > 1:
            counts = ", ".join(str(n) for n in sorted(found))
            raise GptrainError(f"{dataset}/tasks: markers from runs with {counts} tasks; pass --num-tasks")
        if not found:
            raise GptrainError(f"{dataset}/tasks: no task markers; run `gptrain data prepare` first")
        num_tasks = next(iter(found))
    tasks = [ArrayTask(index, num_tasks) for index in range(num_tasks)]
    missing = [task_name(t) for t in tasks if t.index not in found.get(num_tasks, set())]
    if missing:
        named = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise GptrainError(f"{dataset}: cannot finalize, {len(missing)} of {num_tasks} tasks are not done: {named}")
    manifest = build_manifest(dataset, read_task_manifests(dataset, num_tasks))
    write_manifest(dataset, manifest)
    return manifest


def read_task_manifests(dataset: str, num_tasks: int) -> list[dict[str, Any]]:
    """The task manifests of tasks 0..num_tasks-1, in task order."""
    return [_read_task_manifest(dataset, ArrayTask(index, num_tasks)) for index in range(num_tasks)]


def build_manifest(dataset: str, markers: list[dict[str, Any]]) -> dict[str, Any]:
    """Task manifests (in task order) -> the dataset manifest, duplicate editions resolved."""
    params = markers[0]["params"]
    for marker in markers[1:]:
        if marker["params"] != params:
            raise GptrainError(
                f"task {marker['task']['index']} ran with different settings than task 0; rerun it "
                f"({param_diff(params, marker['params'])})"
            )
    return merge_task_manifests(markers, find_duplicates(dataset, markers))


def find_duplicates(dataset: str, markers: list[dict[str, Any]]) -> list[Duplicate]:
    """Resolve duplicate editions over every task's MinHash signatures (checksums verified)."""
    settings = markers[0]["params"]["dedup"]
    if not settings["enabled"]:
        return []
    sketches = []
    for marker in markers:
        signatures = marker["dedup"]["signatures"]
        url = storage.join(dataset, signatures["path"])
        try:
            data = storage.read_bytes(url)
        except FileNotFoundError as err:
            raise GptrainError(f"{url}: MinHash signatures missing; rerun task {marker['task']['index']}") from err
        if hashlib.sha256(data).hexdigest() != signatures["sha256"]:
            raise GptrainError(f"{url}: MinHash signatures are corrupt (sha256 does not match the task manifest); "
                               f"rerun task {marker['task']['index']}")
        sketches += load_sketches(marker["dedup"]["books"], data, url)
    options = DedupOptions(threshold=settings["threshold"], num_perm=settings["num_perm"])
    return resolve(sketches, options)


def write_manifest(dataset: str, manifest: dict[str, Any]) -> None:
    """Write DATASET/manifest.json once every shard it lists matches its checksum."""
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    with Progress(total=sum(s["bytes"] for s in shards), desc="verify shards", unit="B") as progress:
        for shard in shards:
            verify_checksum(storage.join(dataset, shard["path"]), shard["sha256"])
            progress.update(shard["bytes"])
    storage.write_json_atomic(manifest_url(dataset), manifest)


def merge_task_manifests(markers: list[dict[str, Any]], duplicates: list[Duplicate]) -> dict[str, Any]:
    """Task manifests (in task order) -> dataset manifest, without the `duplicates`' tokens.

    A split's stream before dedup is its shards in order (task order, then shard order); each
    dropped book's range (its tokens and its `<|endoftext|>`) is cut out of it, and documents
    get their offsets in what is left."""
    params = markers[0]["params"]
    dropped_ids = {d.book_id for d in duplicates}
    shards: dict[str, list[dict]] = {name: [] for name in SPLITS}
    cuts: dict[str, list[tuple[int, int]]] = {name: [] for name in SPLITS}
    kept: list[tuple[dict, int]] = []  # (document, start in the stream before dedup)
    base = dict.fromkeys(SPLITS, 0)  # where the current task's stream starts, per split
    sources, dropped = [], []
    for marker in markers:
        for shard in marker["shards"]:
            shards[shard["split"]].append(shard)
        for doc in marker["documents"]:
            start = base[doc["split"]] + doc["start"]
            if doc["book_id"] in dropped_ids:
                cuts[doc["split"]].append((start, start + doc["end"] - doc["start"] + 1))
            else:
                kept.append((doc, start))
        for name in SPLITS:
            base[name] += marker["split_tokens"][name]
        sources += marker["sources"]
        dropped += marker["dropped"]
    splits = {name: _split(shards[name], cuts[name], base[name]) for name in SPLITS}
    removed_before = {name: _removed_before(cuts[name]) for name in SPLITS}
    documents = []
    for doc, start in kept:
        new_start = start - removed_before[doc["split"]](start)
        documents.append({**doc, "start": new_start, "end": new_start + doc["end"] - doc["start"]})
        splits[doc["split"]]["documents"] += 1
    dropped += [{"book_id": d.book_id, "reason": d.reason()} for d in duplicates]
    tokenizer = params["tokenizer"]
    return {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": fingerprint(splits, tokenizer, params),
        "tokenizer": tokenizer,
        "vocab_size": params["vocab_size"],
        "eot_id": params["eot_id"],
        "token_dtype": params["token_dtype"],
        "params": params,
        "num_tasks": len(markers),
        "input": markers[0]["input"],
        "splits": splits,
        "documents": documents,
        "sources": sorted(sources, key=lambda s: s["book_id"]),
        "dropped": sorted(dropped, key=lambda d: d["book_id"]),
        "duplicates": [asdict(d) for d in duplicates],
        "tasks": task_digests(markers),
    }


def task_digests(markers: list[dict[str, Any]]) -> list[str]:
    """sha256 of each task manifest's content: which task manifests a dataset manifest merged."""
    return [hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest() for m in markers]


def _split(shards: list[dict], cuts: list[tuple[int, int]], total: int) -> dict[str, Any]:
    """A split's manifest entry: its shards and the segments of them that remain after `cuts`
    (sorted, disjoint [start, end) ranges of the stream before dedup)."""
    segments, position, cut = [], 0, 0
    for index, shard in enumerate(shards):
        start, end = position, position + shard["tokens"]
        while start < end:
            while cut < len(cuts) and cuts[cut][1] <= start:
                cut += 1
            stop = min(end, cuts[cut][0]) if cut < len(cuts) else end
            if start < stop:
                segments.append([index, start - position, stop - position])
                start = stop
            else:  # inside a cut: skip to its end
                start = min(end, cuts[cut][1])
        position = end
    removed = sum(end - start for start, end in cuts)
    return {"tokens": total - removed, "documents": 0, "shards": shards, "segments": segments}


def _removed_before(cuts: list[tuple[int, int]]):
    """position -> tokens cut out of the stream before it (no cut holds the position)."""
    ends = [end for _, end in cuts]
    removed = list(itertools.accumulate(end - start for start, end in cuts))

    def before(position: int) -> int:
        count = bisect.bisect_right(ends, position)
        return removed[count - 1] if count else 0

    return before


def param_diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys)


def _read_task_manifest(dataset: str, task: ArrayTask) -> dict[str, Any]:
    url = task_marker_url(dataset, task)
    try:
        return storage.read_json(url)
    except ValueError as err:
        raise GptrainError(f"{url}: unreadable task manifest; rerun task {task.index} ({err})") from err
