"""`gptrain data prepare/finalize/stats/show`: shards, manifests, array tasks, reruns, S3, bad input."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gptrain.cli import main as gptrain_main
from gptrain.data.clean import CleanOptions
from gptrain.data.loader import TokenDataset, TokenLoader
from gptrain.data.manifest import fingerprint, finalize, load_manifest
from gptrain.data.prepare import PrepareConfig, run_prepare, split_of
from gptrain.data.shards import HEADER_SIZE, parse_header
from gptrain.errors import GptrainError
from gptrain.tokenizer import get_tokenizer
from prepare_fixtures import raw_dir

REPO = Path(__file__).resolve().parents[1]
VAL_FRACTION = 0.3  # with split seed 0: books 11 and 12 go to validation, 13-16 to training


def prepare(raw: Path | str, out: Path | str, **overrides) -> dict:
    settings = dict(workers=2, shard_tokens=500, val_fraction=VAL_FRACTION) | overrides
    return run_prepare(PrepareConfig(input=str(raw), out=str(out), **settings))


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under `folder`: (inode, mtime, content), to prove a rerun wrote nothing."""
    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_prepare_writes_shards_and_manifest(tmp_path, capsys):
    expected = raw_dir(tmp_path / "raw")
    prepare(tmp_path / "raw", tmp_path / "ds")
    manifest = load_manifest(str(tmp_path / "ds"))
    tokenizer = get_tokenizer("gpt2")

    # Kept, dropped (with reasons), split by book id.
    assert [d["book_id"] for d in manifest["documents"]] == sorted(expected)
    reasons = {d["book_id"]: d["reason"] for d in manifest["dropped"]}
    assert reasons[17] == "empty after cleaning"
    assert reasons[18].startswith("catalog language de")
    assert reasons[19].startswith("ASCII share")
    assert {d["book_id"]: d["split"] for d in manifest["documents"]} == {
        b: split_of(b, VAL_FRACTION, 0) for b in expected
    }
    assert {d["split"] for d in manifest["documents"]} == {"train", "val"}

    # The shards hold exactly: each book's tokens then <|endoftext|>, cut every 500 tokens.
    for name, split in manifest["splits"].items():
        stream = []
        for shard in split["shards"]:
            data = (tmp_path / "ds" / shard["path"]).read_bytes()
            header = parse_header(data, shard["path"])
            assert header.dtype == np.uint16 and header.num_tokens == shard["tokens"] <= 500
            assert len(data) == shard["bytes"] == HEADER_SIZE + 2 * shard["tokens"]
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
            stream.append(np.frombuffer(data, dtype="<u2", offset=HEADER_SIZE))
        stream = np.concatenate(stream)
        docs = [d for d in manifest["documents"] if d["split"] == name]
        assert len(stream) == split["tokens"] == sum(d["end"] - d["start"] + 1 for d in docs)
        for doc in docs:
            assert tokenizer.decode(stream[doc["start"] : doc["end"]].tolist()) == expected[doc["book_id"]]
            assert stream[doc["end"]] == tokenizer.eot_id
    assert len(manifest["splits"]["train"]["shards"]) > 1  # documents continue across shard boundaries

    raw_files = sorted((tmp_path / "raw" / "books").iterdir())
    assert [(s["file"], s["sha256"]) for s in manifest["sources"]] == [
        (f"books/{p.name}", hashlib.sha256(p.read_bytes()).hexdigest()) for p in raw_files
    ]
    assert manifest["fingerprint"] == fingerprint(manifest["splits"], manifest["tokenizer"], manifest["params"])
    shas = [s["sha256"] for s in manifest["splits"]["train"]["shards"]]
    assert manifest["params"]["cleaning"] == {"unwrap": True, "artifacts": True, "footnotes": "drop"}
    assert manifest["params"]["dedup"]["enabled"] and manifest["duplicates"] == []
    # Other options that happen to change no token still make another fingerprint.
    prepare(tmp_path / "raw", tmp_path / "kept-notes", clean=CleanOptions(footnotes="keep"))
    other = load_manifest(str(tmp_path / "kept-notes"))
    assert [s["sha256"] for s in other["splits"]["train"]["shards"]] == shas
    assert other["fingerprint"] != manifest["fingerprint"]

    # `show` prints the book as the model sees it; `stats` the totals and fingerprint.
    assert gptrain_main(["data", "show", str(tmp_path / "ds"), "--doc", "13"]) == 0
    assert capsys.readouterr().out == expected[13] + "\n"
    assert "caf\u00e9 na\u00efve" in expected[13]  # the Latin-1 book decoded right
    assert gptrain_main(["data", "stats", str(tmp_path / "ds")]) == 0
    out = capsys.readouterr().out
    assert manifest["fingerprint"] in out and "6 kept, 3 dropped, 9 read" in out
    total = manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"]
    assert f"tokens       {total:,}" in out
    assert gptrain_main(["data", "show", str(tmp_path / "ds"), "--doc", "18"]) == 2
    assert "dropped: catalog language de" in capsys.readouterr().err


def test_rerun_is_a_no_op_and_another_dataset_is_replaced_only_on_request(tmp_path, capsys):
    raw_dir(tmp_path / "raw")
    ds = tmp_path / "ds"
    prepare(tmp_path / "raw", ds)
    before = snapshot(ds)
    prepare(tmp_path / "raw", ds)
    assert snapshot(ds) == before  # no file rewritten, not even the manifest

    # Other settings, other books, another input, another task count: refused, nothing touched.
    refusals = [
        (dict(shard_tokens=2000), r"t0of1 was prepared with other settings \(shard_tokens: 500 vs 2000\)"),
        (dict(clean=CleanOptions(unwrap=False)), r"t0of1 was prepared with other settings \(cleaning: .*'unwrap': True.* vs .*'unwrap': False"),
        (dict(num_tasks=2, task_index=1), r"tasks/t\*of1.json are the markers of a run of 1 task\(s\), this run has 2"),
    ]
    for overrides, message in refusals:
        with pytest.raises(GptrainError, match=rf"{ds} holds another dataset: {message}.*pass --overwrite"):
            prepare(tmp_path / "raw", ds, **overrides)
    raw_dir(tmp_path / "other", extra_books=1)  # one book more
    with pytest.raises(GptrainError, match=r"prepared from other books \(9 books then, 10 now; added 1000\)"):
        prepare(tmp_path / "other", ds)
    book = tmp_path / "raw" / "books" / "pg12.txt"
    book.write_bytes(book.read_bytes().replace(b"begins.", b"begins again."))
    argv = ["data", "prepare", "--input", str(tmp_path / "raw"), "--out", str(ds), "--workers", "1",
            "--shard-tokens", "500", "--val-fraction", str(VAL_FRACTION)]
    assert gptrain_main(argv) == 2
    assert "prepared from other books (book 12 changed (books/pg12.txt))" in capsys.readouterr().err
    assert snapshot(ds) == before

    # --overwrite replaces it: the changed book, and no shard of the old dataset left behind.
    assert gptrain_main(argv + ["--overwrite", "--shard-tokens", "2000"]) == 0
    manifest = load_manifest(str(ds))
    listed = {s["path"] for split in manifest["splits"].values() for s in split["shards"]}
    assert {f"shards/{p.name}" for p in (ds / "shards").iterdir()} == listed
    assert manifest["params"]["shard_tokens"] == 2000
    text = get_tokenizer("gpt2").decode(TokenDataset(str(ds)).document_tokens(12).tolist())
    assert text.startswith("Chapter I. How book 12 begins again.")

    # An array with another task count, with --overwrite: the 1-task run's files go.
    for index in (0, 1):
        prepare(tmp_path / "raw", ds, shard_tokens=2000, num_tasks=2, task_index=index, overwrite=True)
    assert {p.name for p in (ds / "tasks").iterdir()} == {"t0of2.json", "t1of2.json", "t0of2-minhash.npy",
                                                          "t1of2-minhash.npy"}
    assert all("of2-" in p.name for p in (ds / "shards").iterdir())
    assert load_manifest(str(ds))["num_tasks"] == 2


def test_array_tasks_finalize_and_match_a_single_task(tmp_path, capsys):
    expected = raw_dir(tmp_path / "raw")
    prepare(tmp_path / "raw", tmp_path / "one")
    arr = tmp_path / "arr"
    prepare(tmp_path / "raw", arr, task_index=1, num_tasks=2)  # odd book ids only
    assert not (arr / "manifest.json").exists()
    with pytest.raises(GptrainError, match=r"1 of 2 tasks are not done: t0of2"):
        finalize(str(arr))
    assert {p.name.split("-")[1] for p in (arr / "shards").iterdir()} == {"t1of2"}  # a task writes only its files

    prepare(tmp_path / "raw", arr, task_index=0, num_tasks=2)  # the last task to finish finalizes
    manifest = load_manifest(str(arr))
    assert [d["book_id"] for d in manifest["documents"]] == [12, 14, 16, 11, 13, 15]  # task order, then id
    one, two = TokenDataset(str(tmp_path / "one")), TokenDataset(str(arr))
    for book_id in expected:
        assert np.array_equal(one.document_tokens(book_id), two.document_tokens(book_id))

    written = (arr / "manifest.json").read_bytes()
    (arr / "manifest.json").unlink()
    assert gptrain_main(["data", "finalize", str(arr)]) == 0
    assert manifest["fingerprint"] in capsys.readouterr().out
    assert (arr / "manifest.json").read_bytes() == written

    # New settings: the first task to rerun invalidates the manifest; the last one rewrites it.
    prepare(tmp_path / "raw", arr, task_index=1, num_tasks=2, shard_tokens=300, overwrite=True)
    assert not (arr / "manifest.json").exists()  # task 0's marker still has the old settings
    prepare(tmp_path / "raw", arr, task_index=0, num_tasks=2, shard_tokens=500)  # its own marker: nothing to do
    assert not (arr / "manifest.json").exists()  # and no manifest from tasks with different settings
    with pytest.raises(GptrainError, match="task 1 ran with different settings than task 0; rerun it"):
        finalize(str(arr))
    prepare(tmp_path / "raw", arr, task_index=0, num_tasks=2, shard_tokens=300, overwrite=True)
    assert load_manifest(str(arr))["params"]["shard_tokens"] == 300


def test_corrupt_or_truncated_shard_is_named(tmp_path):
    raw_dir(tmp_path / "raw")
    ds = tmp_path / "ds"
    prepare(tmp_path / "raw", ds)
    shard = ds / load_manifest(str(ds))["splits"]["train"]["shards"][1]["path"]
    data = bytearray(shard.read_bytes())
    data[HEADER_SIZE + 7] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(GptrainError, match=rf"{shard.name}: shard is corrupt: sha256"):
        finalize(str(ds))
    loader = TokenLoader(TokenDataset(str(ds)), context_length=16, batch_size=64)
    with pytest.raises(GptrainError, match=rf"{shard.name}: shard is corrupt"):
        for _ in range(10):
            loader.next_batch()
    shard.write_bytes(bytes(data[:-10]))  # even without checksums, a short file is caught
    with pytest.raises(GptrainError, match=rf"{shard.name}: shard is \d+ bytes but its header says"):
        train = TokenDataset(str(ds), verify=False).tokens("train")
        train.read(0, train.num_tokens)


def test_unreadable_or_missing_input_is_reported(tmp_path, capsys):
    with pytest.raises(GptrainError, match="input folder not found"):
        prepare(tmp_path / "nothing", tmp_path / "ds")
    (tmp_path / "empty" / "books").mkdir(parents=True)
    with pytest.raises(GptrainError, match=r"books: no pg<id>.txt books"):
        prepare(tmp_path / "empty", tmp_path / "ds")
    raw_dir(tmp_path / "raw")
    (tmp_path / "raw" / "books" / "pg21.txt").symlink_to(tmp_path / "vanished.txt")
    code = gptrain_main(["data", "prepare", "--input", str(tmp_path / "raw"), "--out", str(tmp_path / "ds"),
                         "--workers", "1"])
    assert code == 2
    assert "pg21.txt: cannot read book" in capsys.readouterr().err
    assert not (tmp_path / "ds" / "tasks").exists()  # no done marker for a failed task
    with pytest.raises(GptrainError, match="no dataset manifest"):
        TokenDataset(str(tmp_path / "ds"))


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_identical_bytes(tmp_path):
    raw_dir(tmp_path / "raw", extra_books=40, paragraphs=200)
    command = [sys.executable, "-m", "gptrain", "data", "prepare", "--input", str(tmp_path / "raw"),
               "--shard-tokens", "20000", "--workers", "1", "--val-fraction", str(VAL_FRACTION)]

    def run(out: Path) -> None:
        subprocess.run(command + ["--out", str(out)], check=True, cwd=REPO, timeout=300)

    killed = tmp_path / "killed"
    # Its own process group, so the kill takes the workers too, as a node failure would.
    proc = subprocess.Popen(command + ["--out", str(killed)], cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list((killed / "shards").glob("*.bin")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert list((killed / "shards").glob("*.bin")) and not (killed / "tasks").exists(), "not killed mid-run"

    run(killed)
    run(tmp_path / "clean")
    files = {str(p.relative_to(killed)): p.read_bytes() for p in sorted(killed.rglob("*")) if p.is_file()}
    clean = {str(p.relative_to(tmp_path / "clean")): p.read_bytes() for p in sorted((tmp_path / "clean").rglob("*"))
             if p.is_file()}
    assert files == clean
    assert len([f for f in files if f.startswith("shards/")]) > 5 and "manifest.json" in files


def test_s3_prepare_and_load(s3_bucket, tmp_path, monkeypatch):
    import fsspec

    expected = raw_dir(tmp_path / "raw")
    fs = fsspec.filesystem("s3")
    fs.put(str(tmp_path / "raw") + "/", f"{s3_bucket}/raw/", recursive=True)
    dataset = f"{s3_bucket}/ds"
    prepare(f"{s3_bucket}/raw", dataset, workers=1)
    assert fs.exists(f"{dataset}/manifest.json") and fs.exists(f"{dataset}/tasks/t0of1.json")
    assert gptrain_main(["data", "stats", dataset]) == 0

    monkeypatch.setenv("GPTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    data = TokenDataset(dataset)
    tokenizer = get_tokenizer("gpt2")
    assert tokenizer.decode(data.document_tokens(14).tolist()) == expected[14]
    x, y = TokenLoader(data, context_length=32, batch_size=4).next_batch()
    assert x.shape == y.shape == (4, 32) and bool((x[:, 1:] == y[:, :-1]).all())
    cached = sorted(p.name for p in (tmp_path / "cache" / "shards").iterdir())
    manifest = load_manifest(dataset)
    assert set(cached) <= {f"{s['sha256']}.bin" for sp in manifest["splits"].values() for s in sp["shards"]}
    assert cached  # shards were copied on first use, named by checksum

    shard = manifest["splits"]["val"]["shards"][0]
    fs.pipe(f"{dataset}/{shard['path']}", b"GPTRTOKS" + bytes(100))  # corrupt it in the bucket
    fresh = TokenDataset(dataset, cache_dir=str(tmp_path / "cache2"))
    with pytest.raises(GptrainError, match=rf"{shard['path']}: shard is corrupt"):
        fresh.document_tokens(11)
    assert not list((tmp_path / "cache2" / "shards").iterdir())  # nothing bad left in the cache
