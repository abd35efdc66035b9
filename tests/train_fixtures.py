"""A small real corpus for training tests: five books from the shared Gutenberg mirror,
downloaded and prepared with the data pipeline once per test session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptrain.data.download import DownloadConfig, download
from gptrain.data.prepare import PrepareConfig, run_prepare

# Alice, The Time Machine, Sleepy Hollow, Jekyll and Hyde, A Christmas Carol. With split seed 0
# and a 0.1 validation share, Sleepy Hollow (about 22k tokens) is the validation split and the
# other four (about 170k tokens) the training split.
BOOK_IDS = (11, 35, 41, 43, 46)
VAL_BOOKS = [41]


def prepare_books(root: Path, mirror: Path) -> str:
    """DATASET folder under `root`, built the first time a test asks for it."""
    dataset = root / "gutenberg-5"
    if not (dataset / "manifest.json").exists():
        raw = root / "gutenberg-5-raw"
        download(DownloadConfig(out=str(raw), mirror=str(mirror), ids=BOOK_IDS, rate=0))
        run_prepare(PrepareConfig(input=str(raw), out=str(dataset), val_fraction=0.1, split_seed=0, workers=1))
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert [d["book_id"] for d in manifest["documents"] if d["split"] == "val"] == VAL_BOOKS
    return str(dataset)


@pytest.fixture(scope="module")
def gutenberg_dataset(tmp_path_factory, mirror_dir) -> str:
    return prepare_books(tmp_path_factory.getbasetemp(), mirror_dir)
