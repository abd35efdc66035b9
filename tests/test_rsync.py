"""`gptrain data download` from rsync mirrors: a real `rsync --daemon` on 127.0.0.1 serving
the shared mirror (gutenberg.org's cache layout) and a module in PG's collection layout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, clean_env, free_port
from download_fixtures import (  # noqa: F401 (no_array_env: an autouse fixture)
    ENGLISH_ON_MIRROR,
    MISSING_ON_MIRROR,
    RsyncDaemon,
    books_on_disk,
    collection_layout,
    ids,
    mirror_book,
    no_array_env,
    report,
    run_cli,
)
from gptrain.data import download as dl
from gptrain.data.catalog import CATALOG_PATH
from gptrain.data.rsync import candidate_paths, rsync_url
from gptrain.errors import GptrainError


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, mirror_dir):
    root = tmp_path_factory.mktemp("rsyncd")
    chosen = collection_layout(mirror_dir, root / "collection")
    with RsyncDaemon(root, {"epub": mirror_dir, "collection": root / "collection"}) as server:
        server.chosen = chosen
        yield server


def test_cache_layout_selection_missing_books_and_a_rerun_that_transfers_nothing(daemon, mirror_dir, tmp_path):
    raw = tmp_path / "raw"
    sent_before = len(daemon.sent())
    assert run_cli("--mirror", daemon.url("epub"), "--out", str(raw)) == 0

    # Only the selected books (English texts) crossed the wire, once each, plus the catalog.
    sent = daemon.sent()[sent_before:]
    assert sorted(sent) == sorted([CATALOG_PATH] + [f"cache/epub/{i}/pg{i}.txt" for i in ENGLISH_ON_MIRROR])
    assert books_on_disk(raw) == ENGLISH_ON_MIRROR
    for book_id in ENGLISH_ON_MIRROR:
        assert (raw / "books" / f"pg{book_id}.txt").read_bytes() == mirror_book(mirror_dir, book_id)
    assert (raw / "catalog.csv").read_bytes() == (mirror_dir / CATALOG_PATH).read_bytes()
    first = report(raw)
    assert {d["file"] for d in first["downloaded"]} == {f"cache/epub/{i}/pg{i}.txt" for i in ENGLISH_ON_MIRROR}
    assert ids(first["not_found"]) == MISSING_ON_MIRROR  # missing books are reported, by the path looked for
    assert first["not_found"][0]["url"] == daemon.url("epub") + "/cache/epub/1/pg1.txt"
    assert first["failed"] == [] and first["bytes_downloaded"] == sum(
        len(mirror_book(mirror_dir, i)) for i in ENGLISH_ON_MIRROR)

    # A rerun transfers nothing: the books are there, the staged catalog is up to date.
    sent_before = len(daemon.sent())
    assert run_cli("--mirror", daemon.url("epub"), "--out", str(raw)) == 0
    assert daemon.sent()[sent_before:] == []
    assert set(report(raw)["skipped"]) == ENGLISH_ON_MIRROR and report(raw)["downloaded"] == []


def test_collection_layout_prefers_utf8_and_array_tasks_split_the_books(daemon, mirror_dir, tmp_path, capsys):
    wanted = ",".join(map(str, sorted([*daemon.chosen, 1661])))
    catalog = str(mirror_dir / CATALOG_PATH)
    # PG's collection module has no catalog: it must come from elsewhere.
    assert run_cli("--mirror", daemon.url("collection"), "--out", str(tmp_path / "x"), "--ids", wanted) == 2
    assert "no Project Gutenberg catalog there" in capsys.readouterr().err
    raw = tmp_path / "raw"
    for index in (0, 1):
        argv = ["--mirror", daemon.url("collection"), "--catalog", catalog, "--out", str(raw), "--ids", wanted]
        assert run_cli(*argv, "--task-index", str(index), "--num-tasks", "2") == 0
    halves = [report(raw, 0, 2), report(raw, 1, 2)]
    for index, half in enumerate(halves):
        assert all(book_id % 2 == index for book_id in ids(half["downloaded"]) | ids(half["not_found"]))
    files = {d["book_id"]: d["file"] for half in halves for d in half["downloaded"]}
    assert files == daemon.chosen  # -0 (UTF-8) before -8 (8-bit) before the ASCII file
    assert [d["book_id"] for half in halves for d in half["not_found"]] == [1661]
    assert books_on_disk(raw) == set(daemon.chosen)
    assert (raw / "books" / "pg11.txt").read_bytes() == mirror_book(mirror_dir, 11)
    collection = daemon.root / "collection"
    assert (raw / "books" / "pg35.txt").read_bytes() == (collection / "3/35/35-8.txt").read_bytes()


@pytest.mark.slow
def test_resume_after_a_kill_mid_transfer(daemon, mirror_dir, tmp_path):
    raw = tmp_path / "raw"
    books = [1661, 2701, 74, 98]  # sent in path order: 1661, 2701, 74, 98 (3.1 MB)
    command = [sys.executable, "-m", "gptrain", "data", "download", "--mirror", daemon.url("epub"), "--out",
               str(raw), "--ids", ",".join(map(str, books))]
    staged_first = raw / ".rsync" / "t0of1" / "cache" / "epub" / "1661" / "pg1661.txt"
    sent_before = len(daemon.sent())
    # Slowed to 500 KiB/s; its own process group, so the kill takes rsync too, as a node failure would.
    proc = subprocess.Popen(command + ["--bwlimit", "500"], cwd=REPO, env=clean_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not staged_first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and staged_first.exists(), "not killed mid-transfer"
    assert not (raw / "books").exists() or not list((raw / "books").glob("pg*.txt"))  # no book half-written
    killed_run = daemon.sent()[sent_before:]
    assert "cache/epub/98/pg98.txt" not in killed_run  # the kill came before the end

    sent_before = len(daemon.sent())
    subprocess.run(command, cwd=REPO, env=clean_env(), check=True, timeout=120)
    resumed = daemon.sent()[sent_before:]
    assert "cache/epub/1661/pg1661.txt" not in resumed  # complete before the kill: not sent again
    assert "cache/epub/98/pg98.txt" in resumed and CATALOG_PATH not in resumed
    assert books_on_disk(raw) == set(books)
    for book_id in books:
        assert (raw / "books" / f"pg{book_id}.txt").read_bytes() == mirror_book(mirror_dir, book_id)
    assert ids(json.loads((raw / "reports" / "download-0-of-1.json").read_text())["downloaded"]) == set(books)


def test_rsync_addresses_and_failures_are_named(daemon, tmp_path):
    assert rsync_url("aleph.gutenberg.org::gutenberg-epub") == "rsync://aleph.gutenberg.org/gutenberg-epub/"
    assert rsync_url("rsync://127.0.0.1:8873/gutenberg/sub/") == "rsync://127.0.0.1:8873/gutenberg/sub/"
    assert candidate_paths(12345)[2:] == ["1/2/3/4/12345/12345-0.txt", "1/2/3/4/12345/12345-8.txt",
                                          "1/2/3/4/12345/12345.txt"]
    assert candidate_paths(7)[4] == "0/7/7.txt"
    with pytest.raises(GptrainError, match=r"an rsync mirror is rsync://HOST\[:PORT\]/MODULE"):
        rsync_url("rsync://host-without-module")
    config = dict(out=str(tmp_path / "raw"), retries=1, backoff=0.01, timeout=5)
    with pytest.raises(GptrainError, match=r"nomodule/: rsync failed: @ERROR: Unknown module 'nomodule'"):
        dl.download(dl.DownloadConfig(mirror=daemon.url("nomodule"), **config))
    closed = f"rsync://127.0.0.1:{free_port()}/epub"
    with pytest.raises(GptrainError, match=rf"{closed}/: rsync failed: .*(refused|socket)"):
        dl.download(dl.DownloadConfig(mirror=closed, **config))
