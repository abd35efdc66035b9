"""Near-duplicate editions on the shared mirror's books plus planted copies: found, resolved at
finalize over an array's tasks, and cut out of both splits."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from gptrain.cli import main as gptrain_main
from gptrain.data.catalog import CATALOG_PATH
from gptrain.data.dedup import DedupOptions, resolve, shingle_hashes, sketch_book
from gptrain.data.loader import TokenDataset
from gptrain.data.manifest import load_manifest
from gptrain.data.prepare import PrepareConfig, run_prepare, split_of
from gptrain.errors import GptrainError
from gptrain.tokenizer import get_tokenizer
from prepare_fixtures import plant_duplicates

VAL_FRACTION = 0.3


@pytest.mark.slow
def test_planted_editions_are_found_and_never_straddle_the_split(mirror_dir, tmp_path, capsys):
    raw = tmp_path / "raw"
    (raw / "books").mkdir(parents=True)
    for folder in (mirror_dir / "cache" / "epub").iterdir():
        if folder.name.isdigit():
            shutil.copyfile(folder / f"pg{folder.name}.txt", raw / "books" / f"pg{folder.name}.txt")
    shutil.copyfile(mirror_dir / CATALOG_PATH, raw / "catalog.csv")
    planted = plant_duplicates(mirror_dir, raw / "books", VAL_FRACTION)
    real = {int(p.name[2:-4]) for p in raw.glob("books/pg*.txt")} - set(planted)

    # Every book of every language (Alice is here in four): distinct books, however alike.
    ds = tmp_path / "ds"
    for index in (0, 1):
        run_prepare(PrepareConfig(input=str(raw), out=str(ds), workers=1, val_fraction=VAL_FRACTION, languages=(),
                                  min_ascii_fraction=0, task_index=index, num_tasks=2))
    manifest = load_manifest(str(ds))

    found = {d["book_id"]: d for d in manifest["duplicates"]}
    assert {book: d["duplicate_of"] for book, d in found.items()} == planted  # all found, nothing else dropped
    assert {book for book, d in found.items() if d["relation"] == "part"} == {b for b, o in planted.items() if o == 98}
    assert all(d["containment"] >= 0.8 for d in found.values())
    kept = {d["book_id"]: d for d in manifest["documents"]}
    assert set(kept) == real  # every real book kept, none of the planted ones
    for book_id, original in planted.items():
        assert split_of(book_id, VAL_FRACTION, 0) != kept[original]["split"]  # without dedup: both sides
    reasons = {d["book_id"]: d["reason"] for d in manifest["dropped"]}
    assert reasons[next(iter(planted))].startswith("duplicate: an edition of book 11 (similarity")

    # The dropped copies' tokens are in their tasks' shards but in neither split.
    data, tokenizer = TokenDataset(str(ds)), get_tokenizer("gpt2")
    for name, split in manifest["splits"].items():
        docs = [d for d in manifest["documents"] if d["split"] == name]
        assert split["tokens"] == data.tokens(name).num_tokens == sum(d["end"] - d["start"] + 1 for d in docs)
    val_text = tokenizer.decode(data.tokens("val").read(0, data.tokens("val").num_tokens).tolist())
    train_text = tokenizer.decode(data.tokens("train").read(0, data.tokens("train").num_tokens).tolist())
    for original in set(planted.values()):
        opening = tokenizer.decode(data.document_tokens(original)[:40].tolist())
        inside, other = (val_text, train_text) if kept[original]["split"] == "val" else (train_text, val_text)
        assert opening in inside and opening.upper() not in other.upper()  # the work sits on one side only

    assert gptrain_main(["data", "show", str(ds), "--doc", str(next(iter(planted)))]) == 2
    assert "it was dropped: duplicate: an edition of book 11" in capsys.readouterr().err
    written = (ds / "manifest.json").read_bytes()
    assert gptrain_main(["data", "finalize", str(ds)]) == 0
    assert (ds / "manifest.json").read_bytes() == written  # the same decisions, byte for byte

    # Without dedup every copy stays; the fingerprint tells the datasets apart.
    plain = tmp_path / "plain"
    run_prepare(PrepareConfig(input=str(raw), out=str(plain), workers=1, val_fraction=VAL_FRACTION, languages=(),
                              min_ascii_fraction=0, dedup=DedupOptions(enabled=False)))
    undeduped = load_manifest(str(plain))
    assert undeduped["duplicates"] == [] and len(undeduped["documents"]) == len(real) + len(planted)
    assert undeduped["params"]["dedup"] == {"enabled": False} and undeduped["fingerprint"] != manifest["fingerprint"]


def test_shingles_ignore_case_layout_and_punctuation():
    text = "The Café—on the “old” road, said he; and then he went home again."
    variants = [
        text.upper(),
        text.replace(" ", "\n").replace("—", " -- "),
        "THE CAFÉ--ON THE \"OLD\" ROAD, SAID HE; AND THEN HE WENT HOME AGAIN.",
    ]
    for variant in variants:
        assert np.array_equal(shingle_hashes(variant), shingle_hashes(text)), variant
    assert len(shingle_hashes(text)) == 10  # 14 words: 10 five-word shingles
    assert len(np.intersect1d(shingle_hashes(text), shingle_hashes("And then he went home again to sleep."))) == 2


def test_resolution_keeps_the_best_edition_whatever_the_order():
    words = " ".join(f"w{i}" for i in range(40_000))  # big enough for sampled shingles
    sketches = [
        sketch_book(5, words.upper().encode("latin-1"), words.upper(), 128),  # caps, 8-bit... but ASCII bytes
        sketch_book(9, words.encode(), words + " café", 128),
        sketch_book(3, (words + " é").encode("latin-1"), words, 128),  # Latin-1 file
        sketch_book(20, b"x", " ".join(f"v{i}" for i in range(20_000)), 128),  # another work
    ]
    assert [s.encoding for s in sketches] == ["ascii", "ascii", "latin-1", "ascii"] and sketches[0].all_caps
    options = DedupOptions()
    first = resolve(sketches, options)
    assert resolve(sketches[::-1], options) == first
    assert {d.book_id: d.duplicate_of for d in first} == {5: 9, 3: 9}  # mixed case, ASCII: book 9 stays
    with pytest.raises(GptrainError, match="dedup threshold must be within"):
        DedupOptions(threshold=0)
