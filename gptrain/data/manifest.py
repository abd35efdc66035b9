"""Dataset layout, task manifests and the dataset manifest (`gptrain data finalize`).

    DATASET/shards/<split>-t<i>of<n>-<k>.bin   token shards written by task i of n
    DATASET/tasks/t<i>of<n>.json               task i's manifest: its done marker, written last
    DATASET/manifest.json                      the dataset's entry point, written by finalize

Each task owns its books (`ArrayTask.owns(book_id)`) and writes only its own files, so an
array's tasks never coordinate. A split's token stream is the concatenation of the tasks'
streams in task order, each being its books in id order, separated by `<|endoftext|>`.
Nothing here holds a timestamp, so rerunning a task reproduces its files byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from gptrain import storage
from gptrain.array_task import ArrayTask
from gptrain.data.shards import verify_checksum
from gptrain.errors import GptrainError
from gptrain.progress import Progress

FORMAT = "gptrain-dataset"
VERSION = 1
SPLITS = ("train", "val")
MANIFEST = "manifest.json"
_TASK_MARKER = re.compile(r"t(\d+)of(\d+)\.json$")


def task_name(task: ArrayTask) -> str:
    return f"t{task.index}of{task.count}"


def task_marker_url(dataset: str, task: ArrayTask) -> str:
    return storage.join(dataset, "tasks", f"{task_name(task)}.json")


def manifest_url(dataset: str) -> str:
    return storage.join(dataset, MANIFEST)


def fingerprint(shard_sha256s: list[str], tokenizer_spec: dict, split_params: dict) -> str:
    """Identifies the dataset's content: same tokens, tokenizer and split -> same fingerprint."""
    payload = {"shards": sorted(shard_sha256s), "tokenizer": tokenizer_spec, "split": split_params}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def split_params(params: dict) -> dict:
    return {"val_fraction": params["val_fraction"], "split_seed": params["split_seed"]}


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
    manifest = merge_task_manifests(read_task_manifests(dataset, num_tasks))
    write_manifest(dataset, manifest)
    return manifest


def read_task_manifests(dataset: str, num_tasks: int) -> list[dict[str, Any]]:
    """The task manifests of tasks 0..num_tasks-1, in task order."""
    return [_read_task_manifest(dataset, ArrayTask(index, num_tasks)) for index in range(num_tasks)]


def write_manifest(dataset: str, manifest: dict[str, Any]) -> None:
    """Write DATASET/manifest.json once every shard it lists matches its checksum."""
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    with Progress(total=sum(s["bytes"] for s in shards), desc="verify shards", unit="B") as progress:
        for shard in shards:
            verify_checksum(storage.join(dataset, shard["path"]), shard["sha256"])
            progress.update(shard["bytes"])
    storage.write_json_atomic(manifest_url(dataset), manifest)


def merge_task_manifests(markers: list[dict[str, Any]]) -> dict[str, Any]:
    """Task manifests (in task order) -> dataset manifest; document offsets become split-global."""
    params = markers[0]["params"]
    for marker in markers[1:]:
        if marker["params"] != params:
            raise GptrainError(
                f"task {marker['task']['index']} ran with different settings than task 0; rerun it "
                f"({_param_diff(params, marker['params'])})"
            )
    splits = {name: {"tokens": 0, "documents": 0, "shards": []} for name in SPLITS}
    documents, sources, dropped = [], [], []
    for marker in markers:
        for doc in marker["documents"]:
            offset = splits[doc["split"]]["tokens"]
            documents.append({**doc, "start": doc["start"] + offset, "end": doc["end"] + offset})
            splits[doc["split"]]["documents"] += 1
        for shard in marker["shards"]:
            splits[shard["split"]]["shards"].append(shard)
        for name in SPLITS:
            splits[name]["tokens"] += marker["split_tokens"][name]
        sources += marker["sources"]
        dropped += marker["dropped"]
    tokenizer = params["tokenizer"]
    all_shards = [s["sha256"] for split in splits.values() for s in split["shards"]]
    return {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": fingerprint(all_shards, tokenizer, split_params(params)),
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
    }


def _read_task_manifest(dataset: str, task: ArrayTask) -> dict[str, Any]:
    url = task_marker_url(dataset, task)
    try:
        return storage.read_json(url)
    except ValueError as err:
        raise GptrainError(f"{url}: unreadable task manifest; rerun task {task.index} ({err})") from err


def _param_diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys)
