"""`gptrain data download` against real HTTP servers, real folders and a real S3 server."""

from __future__ import annotations

import json
import logging
import re
import threading
import time

import pytest

import jobs.__main__ as jobs_cli
from conftest import REPO, free_port
from download_fixtures import (  # noqa: F401 (no_array_env: an autouse fixture)
    ENGLISH_ON_MIRROR,
    ENGLISH_TEXTS,
    MISSING_ON_MIRROR,
    SLOW,
    FaultyMirror,
    books_on_disk,
    full_size_catalog,
    ids,
    mirror_book,
    no_array_env,
    report,
    run_cli,
)
from gptrain.data import download as dl
from gptrain.data import http_mirror
from gptrain.data.catalog import (
    CATALOG_PATH,
    Selection,
    parse_catalog,
    parse_id_range,
    parse_languages,
    read_catalog,
    select_books,
)
from gptrain.errors import GptrainError
from k8s_fixtures import find, render

SOUND_BOOK = 19573
# Fast, bounded retries for tests; the defaults are for gutenberg.org.
FAST = ["--rate", "0", "--backoff", "0.02", "--timeout", "1.0"]


@pytest.fixture
def faulty_mirror(mirror_dir):
    with FaultyMirror(mirror_dir) as server:
        yield server


# --- catalog -----------------------------------------------------------------------------------


def test_catalog_parses_multiline_titles_and_language_lists(mirror_dir):
    entries = read_catalog(str(mirror_dir / CATALOG_PATH))
    by_id = {e.book_id: e for e in entries}
    assert len(entries) == 35
    assert by_id[44157].title == "Entre Nous\nLectures Françaises à l'usage des ecoles primaires - I"
    assert by_id[16119].languages == ("en", "es", "tl")
    assert by_id[SOUND_BOOK].type == "Sound"
    assert by_id[1184].authors == "Alexandre Dumas; Auguste Maquet" and by_id[1184].issued == "1998-01-01"

    assert {e.book_id for e in select_books(entries, Selection(("en",)))} == ENGLISH_TEXTS
    # A multi-language book counts for each of its languages.
    assert [e.book_id for e in select_books(entries, Selection(parse_languages("TL, nl")))] == [16119, 24675]
    assert [e.book_id for e in select_books(entries, Selection(("en",), types=("Sound",)))] == [SOUND_BOOK]


def test_full_size_catalog_parses_in_seconds_and_selects_by_subject_shelf_and_ids():
    data, facts = full_size_catalog(75_000)
    started = time.perf_counter()
    entries = parse_catalog(data, "pg_catalog.csv")
    print(f"parsed {len(entries):,} catalog rows ({len(data) / 1e6:.1f} MB) in {time.perf_counter() - started:.2f} s")
    assert len(entries) == 75_000 and entries[99].title == 'Book 100\nOr, a subtitle, "quoted"'
    english_texts = {f["id"] for f in facts if f["type"] == "Text" and "en" in f["languages"].split("; ")}
    assert {e.book_id for e in select_books(entries, Selection())} == english_texts
    science_fiction = Selection(subjects=("SCIENCE FICTION",))
    assert {e.book_id for e in select_books(entries, science_fiction)} == {i for i in english_texts if i % 13 == 0}
    poetry_or_scifi = Selection(subjects=("science fiction", "poetry"), bookshelves=("poetry",))
    assert {e.book_id for e in select_books(entries, poetry_or_scifi)} == {
        i for i in english_texts if i % 17 == 0 and i % 13 == 0}
    ranges = Selection(id_ranges=((1, 100), (74_990, 80_000)))
    assert [e.book_id for e in select_books(entries, ranges)] == sorted(
        i for i in english_texts if i <= 100 or i >= 74_990)
    with pytest.raises(GptrainError, match="id range 9-3: the first id must not be above the last"):
        Selection(id_ranges=((9, 3),))
    with pytest.raises(GptrainError, match="id range 'x-3': expected FIRST-LAST"):
        parse_id_range("x-3")


def test_corrupt_catalogs_are_rejected_naming_the_source():
    with pytest.raises(GptrainError, match=r"src\.csv: not a Project Gutenberg catalog.*lacks column"):
        parse_catalog(b"<html><body>Mirror maintenance</body></html>\n", "src.csv")
    with pytest.raises(GptrainError, match=r"src\.csv: not a Project Gutenberg catalog \(not UTF-8"):
        parse_catalog(b"Text#,Type\xff\n", "src.csv")
    header = b"Text#,Type,Issued,Title,Language,Authors,Subjects,LoCC,Bookshelves\n"
    with pytest.raises(GptrainError, match=r"src\.csv: line 3: Text# 'x12' is not a book number"):
        parse_catalog(header + b"1,Text,1971-12-01,T,en,A,,,\nx12,Text,2000-01-01,T,en,A,,,\n", "src.csv")
    with pytest.raises(GptrainError, match=r"src\.csv: line 2: expected at least 6 fields, got 3"):
        parse_catalog(header + b"1,Text,1971-12-01\n", "src.csv")
    with pytest.raises(GptrainError, match="give at least one language"):
        parse_languages(" , ")


# --- downloading over HTTP ---------------------------------------------------------------------


def test_downloads_english_texts_with_retries_and_rerun_is_a_no_op(faulty_mirror, mirror_dir, tmp_path):
    raw = tmp_path / "raw"
    faulty_mirror.latency_s = 0.05  # so that the 4 workers overlap
    faulty_mirror.fail("/cache/epub/11/pg11.txt", 503, 503)
    faulty_mirror.fail("/cache/epub/35/pg35.txt", SLOW)
    argv = ["--mirror", faulty_mirror.url, "--out", str(raw), "--concurrency", "4", *FAST]

    assert run_cli(*argv) == 0

    # Only English texts were asked for: not the Sound row, not the other languages.
    assert set(faulty_mirror.book_requests()) == ENGLISH_TEXTS
    assert faulty_mirror.book_requests().count(11) == 3 and faulty_mirror.book_requests().count(35) == 2
    assert all(r.user_agent.startswith("gptrain/") for r in faulty_mirror.requests)
    assert 2 <= faulty_mirror.max_in_flight <= 4
    assert books_on_disk(raw) == ENGLISH_ON_MIRROR
    for book_id in ENGLISH_ON_MIRROR:
        assert (raw / "books" / f"pg{book_id}.txt").read_bytes() == mirror_book(mirror_dir, book_id)
    assert (raw / "catalog.csv").read_bytes() == (mirror_dir / CATALOG_PATH).read_bytes()
    assert not [p for p in (raw / "books").iterdir() if ".tmp-" in p.name]

    first = report(raw)
    assert ids(first["downloaded"]) == ENGLISH_ON_MIRROR and first["selected"] == len(ENGLISH_TEXTS)
    assert ids(first["not_found"]) == MISSING_ON_MIRROR
    assert first["not_found"][0]["url"] == faulty_mirror.url + "cache/epub/1/pg1.txt"
    assert first["failed"] == [] and first["skipped"] == []
    attempts = {d["book_id"]: d["attempts"] for d in first["downloaded"]}
    assert attempts[11] == 3 and attempts[35] == 2
    assert first["bytes_downloaded"] == sum(len(mirror_book(mirror_dir, i)) for i in ENGLISH_ON_MIRROR)

    # Rerun: the books present are not fetched again (only the catalog and the 404s are asked for).
    mtimes = {p.name: p.stat().st_mtime_ns for p in (raw / "books").iterdir()}
    before = len(faulty_mirror.requests)
    assert run_cli(*argv) == 0
    rerun_paths = faulty_mirror.paths()[before:]
    expected = ["/" + CATALOG_PATH] + ["/" + dl.mirror_book_path(i) for i in MISSING_ON_MIRROR]
    assert sorted(rerun_paths) == sorted(expected)
    assert {p.name: p.stat().st_mtime_ns for p in (raw / "books").iterdir()} == mtimes
    second = report(raw)
    assert set(second["skipped"]) == ENGLISH_ON_MIRROR and second["downloaded"] == []


def test_retry_after_is_honoured_and_failures_set_the_exit_status(faulty_mirror, tmp_path, caplog):
    raw = tmp_path / "raw"
    faulty_mirror.fail("/cache/epub/7/pg7.txt", 429)  # with Retry-After: 1
    faulty_mirror.fail_always("/cache/epub/41/pg41.txt", 500)
    caplog.set_level(logging.INFO, logger="gptrain")

    rc = run_cli("--mirror", faulty_mirror.url, "--out", str(raw), "--ids", "3,7,41", "--retries", "2", *FAST)

    assert rc == 1
    first, second = faulty_mirror.times("/cache/epub/7/pg7.txt")
    assert second - first >= 0.9  # the server's Retry-After, not the 0.02 s backoff
    assert faulty_mirror.book_requests().count(41) == 3
    result = report(raw)
    assert ids(result["downloaded"]) == {3, 7}
    assert result["failed"] == [{"book_id": 41, "url": faulty_mirror.url + "cache/epub/41/pg41.txt",
                                 "reason": "HTTP 500 Internal Server Error", "attempts": 3}]
    assert books_on_disk(raw) == {3, 7}
    assert any("2 downloaded" in m and "1 failed" in m for m in caplog.messages)


def test_two_array_tasks_split_the_books_like_one_task(mirror_url, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli("--mirror", mirror_url, "--out", str(one), "--limit", "10", *FAST) == 0
    for index in (0, 1):
        argv = ["--mirror", mirror_url, "--out", str(two), "--limit", "10", "--task-index", str(index)]
        assert run_cli(*argv, "--num-tasks", "2", *FAST) == 0

    single, halves = report(one), [report(two, 0, 2), report(two, 1, 2)]
    first_ten = sorted(ENGLISH_TEXTS)[:10]
    assert ids(single["downloaded"]) | ids(single["not_found"]) == set(first_ten)
    for index, half in enumerate(halves):
        assert all(i % 2 == index for i in ids(half["downloaded"]) | ids(half["not_found"]))
    assert ids(halves[0]["downloaded"]).isdisjoint(ids(halves[1]["downloaded"]))
    assert ids(halves[0]["downloaded"]) | ids(halves[1]["downloaded"]) == ids(single["downloaded"])
    assert ids(halves[0]["not_found"]) | ids(halves[1]["not_found"]) == ids(single["not_found"])
    assert books_on_disk(two) == books_on_disk(one)


def test_array_index_and_count_default_from_slurm_and_kubernetes(mirror_dir, tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    argv = ["--mirror", str(mirror_dir), "--out", str(raw), "--limit", "12", *FAST]
    first_twelve = sorted(ENGLISH_TEXTS)[:12]

    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert run_cli(*argv) == 0
    slurm = report(raw, 1, 2)
    assert ids(slurm["downloaded"]) | ids(slurm["not_found"]) == {i for i in first_twelve if i % 2 == 1}

    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    monkeypatch.setenv("GPTRAIN_NUM_TASKS", "3")
    assert run_cli(*argv) == 0
    k8s = report(raw, 2, 3)
    handled = ids(k8s["downloaded"]) | ids(k8s["not_found"]) | set(k8s["skipped"])
    assert handled == {i for i in first_twelve if i % 3 == 2}
    assert k8s["skipped"] == [11, 35, 41]  # odd ids: the Slurm task above got them already


def test_local_folder_mirror_with_several_languages(mirror_dir, tmp_path, capsys):
    raw = tmp_path / "raw"
    # What a run killed mid-write leaves: a temporary file, never a partial pg<id>.txt.
    (raw / "books").mkdir(parents=True)
    (raw / "books" / "pg16119.txt.tmp-0badf00d").write_bytes(mirror_book(mirror_dir, 16119)[:1000])
    assert run_cli("--mirror", str(mirror_dir), "--out", str(raw), "--languages", "tl,nl", *FAST) == 0
    assert books_on_disk(raw) == {16119, 24675}
    for book_id in (16119, 24675):
        assert (raw / "books" / f"pg{book_id}.txt").read_bytes() == mirror_book(mirror_dir, book_id)
    # --ids picks among the chosen languages; a book outside them is an error, not silently dropped.
    argv = ["--mirror", str(mirror_dir), "--out", str(raw), "--languages", "tl,nl", "--ids", "2000,16119"]
    assert run_cli(*argv) == 2
    assert "error: --ids 2000: not Text books in languages tl,nl in " in capsys.readouterr().err


def test_output_to_s3(faulty_mirror, s3_bucket, mirror_dir):
    import s3fs

    raw = f"{s3_bucket}/raw"
    argv = ["--mirror", faulty_mirror.url, "--out", raw, "--ids", "1,3,7", *FAST]
    assert run_cli(*argv) == 0
    fs = s3fs.S3FileSystem()
    bucket = s3_bucket.removeprefix("s3://")
    assert fs.cat_file(f"{bucket}/raw/books/pg3.txt") == mirror_book(mirror_dir, 3)
    assert fs.cat_file(f"{bucket}/raw/books/pg7.txt") == mirror_book(mirror_dir, 7)
    assert fs.cat_file(f"{bucket}/raw/catalog.csv") == (mirror_dir / CATALOG_PATH).read_bytes()
    result = json.loads(fs.cat_file(f"{bucket}/raw/reports/download-0-of-1.json"))
    assert ids(result["downloaded"]) == {3, 7} and ids(result["not_found"]) == {1}

    before = len(faulty_mirror.requests)
    assert run_cli(*argv) == 0
    assert faulty_mirror.paths()[before:] == ["/" + CATALOG_PATH, "/cache/epub/1/pg1.txt"]  # the 404 again
    rerun = json.loads(fs.cat_file(f"{bucket}/raw/reports/download-0-of-1.json"))
    assert rerun["skipped"] == [3, 7] and rerun["downloaded"] == []


# --- bad input ---------------------------------------------------------------------------------


def test_unreachable_or_wrong_mirrors_name_the_url(faulty_mirror, tmp_path):
    closed = f"http://127.0.0.1:{free_port()}/"  # nothing listens there
    cases = [
        (closed, rf"{closed}{CATALOG_PATH}: cannot read the catalog \(URLError: .*refused"),
        (str(tmp_path / "nowhere"), r"nowhere/cache/epub/feeds/pg_catalog\.csv: no Project Gutenberg catalog"),
        (faulty_mirror.url + "files/", rf"{faulty_mirror.url}files/{CATALOG_PATH}: no Project Gutenberg"),
        ("nosuchproto://bucket/mirror", r"--mirror nosuchproto://bucket/mirror: not a folder, http\(s\) or"),
    ]
    for mirror, message in cases:
        config = dl.DownloadConfig(out=str(tmp_path / "raw"), mirror=mirror, retries=1, backoff=0.01, rate=0)
        with pytest.raises(GptrainError, match=message):
            dl.download(config)
    assert not (tmp_path / "raw").exists()  # nothing written for a mirror we cannot read


def test_corrupt_catalog_on_mirror_names_the_url(faulty_mirror, tmp_path, capsys):
    faulty_mirror.serve_body("/" + CATALOG_PATH, b"<!DOCTYPE html>\n<title>Not here</title>\n")
    assert run_cli("--mirror", faulty_mirror.url, "--out", str(tmp_path / "raw"), *FAST) == 2
    error = capsys.readouterr().err
    assert f"gptrain data: error: {faulty_mirror.url}{CATALOG_PATH}: not a Project Gutenberg catalog" in error


def test_bad_settings_are_rejected(mirror_dir, tmp_path):
    with pytest.raises(GptrainError, match="concurrency must be >= 1, got 0"):
        dl.DownloadConfig(out="raw", concurrency=0)
    with pytest.raises(GptrainError, match="rate must be >= 0"):
        dl.DownloadConfig(out="raw", rate=-1)
    with pytest.raises(SystemExit):
        run_cli("--out", "raw", "--ids", "11,x")
    (tmp_path / "a-file").write_text("not a folder")
    out = str(tmp_path / "a-file" / "raw")
    with pytest.raises(GptrainError, match=rf"--out {out}: cannot write {out}/catalog\.csv"):
        dl.download(dl.DownloadConfig(out=out, mirror=str(mirror_dir)))


# --- politeness --------------------------------------------------------------------------------


def test_http_mirrors_get_a_polite_rate_by_default(faulty_mirror, tmp_path):
    argv = ["--mirror", faulty_mirror.url, "--out", str(tmp_path / "raw"), "--ids", "3,7,26060"]
    assert run_cli(*argv) == 0
    starts = [r.time for r in faulty_mirror.requests]
    assert len(starts) == 4  # the catalog and 3 books, at most 2 per second
    assert starts[-1] - starts[0] >= 3 * (1 / http_mirror.POLITE_HTTP_RATE) * 0.95


def test_gutenberg_org_serves_one_task_and_small_selections(tmp_path, capsys):
    dl.check_main_site("https://www.gutenberg.org/", 1, dl.MAIN_SITE_MAX_BOOKS)
    with pytest.raises(GptrainError, match=r"not an array of 2: use an rsync mirror \(--mirror rsync://aleph"):
        dl.check_main_site("https://gutenberg.org/", 2)
    with pytest.raises(GptrainError, match=rf"{dl.MAIN_SITE_MAX_BOOKS + 1} books selected; gutenberg.org serves"):
        dl.check_main_site("https://www.gutenberg.org/", 1, dl.MAIN_SITE_MAX_BOOKS + 1)
    dl.check_main_site("http://127.0.0.1:8000/", 8, 70_000)  # other mirrors: the array shares the rate instead
    # The default mirror, as task 0 of an array: refused before any request leaves the machine.
    assert run_cli("--out", str(tmp_path / "raw"), "--task-index", "0", "--num-tasks", "8") == 2
    assert "gutenberg.org asks for bulk downloads to use a mirror" in capsys.readouterr().err
    assert not (tmp_path / "raw").exists()


def test_the_launchers_download_arrays_from_the_rsync_mirror_by_default():
    """Slurm, submitit and Kubernetes run the download as a job array, which gutenberg.org
    refuses: by default they use Project Gutenberg's rsync mirror, which any array may use."""
    sbatch = (REPO / "slurm" / "preprocess.sbatch").read_text()
    env_config = next(c for c in find(render("base"), "ConfigMap") if "GPTRAIN_MIRROR" in c["data"])
    defaults = {
        "slurm/preprocess.sbatch": re.search(r'--mirror "\$\{GPTRAIN_MIRROR:-([^}]+)\}"', sbatch)[1],
        "python -m jobs preprocess": jobs_cli.build_parser().parse_args(["preprocess"]).mirror,
        "k8s/base": env_config["data"]["GPTRAIN_MIRROR"],
    }
    assert defaults == dict.fromkeys(defaults, dl.SUGGESTED_MIRROR)
    assert dl.SUGGESTED_MIRROR == "rsync://aleph.gutenberg.org/gutenberg-epub"
    dl.check_main_site(dl.SUGGESTED_MIRROR, 8, 75_000)


def test_an_array_shares_one_http_rate(faulty_mirror, tmp_path):
    """Two tasks at once with --rate 4: each starts 2 requests/s, so together they keep to 4/s."""
    errors = []

    def task(index: int) -> None:
        config = dl.DownloadConfig(out=str(tmp_path / "raw"), mirror=faulty_mirror.url, ids=(3, 7, 11, 35, 41, 43),
                                   rate=4, task_index=index, num_tasks=2)
        try:
            dl.download(config)
        except Exception as err:  # noqa: BLE001 (reported below, in the test's thread)
            errors.append(err)

    threads = [threading.Thread(target=task, args=(index,)) for index in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    starts = sorted(r.time for r in faulty_mirror.requests)
    assert len(starts) == 8  # each task: the catalog and its 3 books
    # Both tasks may start at once; after that, 4 per second between them, not 8.
    assert starts[-1] - starts[0] >= (len(starts) - 2) / 4 * 0.95


def test_rate_limit_spaces_requests_across_threads():
    limiter = http_mirror.RateLimiter(rate=20.0)
    starts: list[float] = []

    def worker() -> None:
        for _ in range(4):
            limiter.wait()
            starts.append(time.monotonic())

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 12 requests at 20/s from 3 threads: the first at once, the last 11 intervals later.
    assert max(starts) - min(starts) >= 11 * 0.05 * 0.95


def test_retry_after_accepts_seconds_and_http_dates():
    assert http_mirror._retry_after_seconds("3") == 3.0
    assert http_mirror._retry_after_seconds(None) is None
    assert http_mirror._retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert http_mirror._retry_after_seconds("86400") == http_mirror.MAX_RETRY_AFTER_S
