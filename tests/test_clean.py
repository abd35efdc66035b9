"""Cleaning: decoding, line endings, every PG marker style, blank lines, the English filter.
Prose cleaning (unwrapping, artifacts) against hand-written truth: tests/test_prose.py."""

from __future__ import annotations

import re

import pytest

from gptrain.data.catalog import read_catalog
from gptrain.data.clean import (
    MARKERS_ONLY,
    CleanOptions,
    LanguageFilter,
    ascii_fraction,
    clean_book,
    collapse_blank_lines,
    decode,
)
from gptrain.errors import GptrainError
from prepare_fixtures import GERMAN, GREEK, body, etext_1990s, modern, no_space, older

# Lines that only PG's header, footer and licence contain.
PG_LINES = re.compile(
    r"START OF (THE|THIS) PROJECT GUTENBERG|END OF (THE|THIS) PROJECT GUTENBERG|SMALL PRINT|FULL LICENSE"
    r"|Project Gutenberg License|This (e)?book is for the use of anyone|Updated editions will replace"
    r"|Project Gutenberg Literary Archive Foundation|This file should be named|(?-i:^Produced by|^E-text prepared by)"
    r"|^Release date:|^Character set encoding",
    re.IGNORECASE | re.MULTILINE,
)


def crlf(text: str) -> str:
    return text.replace("\n", "\r\n")


@pytest.mark.parametrize(
    "style,raw",
    [
        ("modern, BOM, CRLF", lambda b: b"\xef\xbb\xbf" + crlf(modern(1, b)).encode()),
        ("modern, LF", lambda b: modern(1, b).encode()),
        ("older THIS, latin-1, CRLF", lambda b: crlf(older(1, b)).encode("latin-1")),
        ("***START no space", lambda b: no_space(1, b).encode()),
        ("1990s small print, no footer", lambda b: crlf(etext_1990s(1, b)).encode()),
        ("1990s small print, END OF ETEXT footer", lambda b: etext_1990s(1, b, footer=True).encode()),
        ("lone CR line endings", lambda b: modern(1, b).replace("\n", "\r").encode()),
    ],
)
def test_each_marker_style_gives_exactly_the_body(style, raw):
    text = body(7).replace("begins.", "begins at the caf\u00e9.")
    cleaned = clean_book(raw(text), MARKERS_ONLY)
    assert cleaned == text, style
    assert not PG_LINES.search(cleaned)


def test_decode_utf8_bom_and_latin1():
    assert decode("caf\u00e9".encode()) == "caf\u00e9"
    assert decode(b"\xef\xbb\xbfcaf\xc3\xa9") == "caf\u00e9"  # the BOM is not text
    assert decode(b"caf\xe9") == "caf\u00e9"  # not UTF-8: Latin-1
    assert decode(b"\xef\xbb\xbfna\xefve") == "na\u00efve"  # a BOM on Latin-1 bytes is still dropped


def test_blank_line_runs_collapse_like_the_reference():
    assert collapse_blank_lines("a\n\n\n   \n\t\nb\nc") == "a\n\nb\nc"
    assert collapse_blank_lines("a\n\n\n    indented") == "a\n\n    indented"  # indentation kept


def test_clean_options_are_checked():
    with pytest.raises(GptrainError, match="footnotes must be one of drop, keep, got 'inline'"):
        CleanOptions(footnotes="inline")


def test_empty_after_stripping_is_empty():
    assert clean_book(modern(1, "\n\n   \n").encode()) == ""
    assert clean_book(older(1, "").encode()) == ""
    assert clean_book(b"") == ""


def test_text_without_markers_is_kept():
    assert clean_book(b"Just a story.\r\n\r\n\r\nThe end.\r\n") == "Just a story.\n\nThe end."
    assert clean_book(b"\xef\xbb\xbfJust a story.") == "Just a story."


def test_language_filter_ascii_share_and_catalog():
    english = LanguageFilter(("en",), 0.9)
    assert english.rejection(body(1), ("en",)) is None
    assert english.rejection(body(1), None) is None  # no catalog row: the ASCII test alone
    assert ascii_fraction(GERMAN) > 0.9  # German passes the reference's ASCII rule...
    assert "catalog language de" in english.rejection(GERMAN, ("de",))  # ...the catalog catches it
    assert english.rejection(body(1), ("en", "es", "tl")) is None  # multi-language books count
    assert "ASCII share" in english.rejection(GREEK, None)
    assert LanguageFilter((), 0.0).rejection(GREEK, ("grc",)) is None  # both tests can be turned off
    assert LanguageFilter(("de",), 0.9).rejection(GERMAN, ("de",)) is None
    with pytest.raises(GptrainError, match="min_ascii_fraction"):
        LanguageFilter(("en",), 1.5)


# Real files from the shared mirror: (id, style, first and last body lines).
REAL_BOOKS = [
    (3, "1990s Etext, CRLF, no footer", "JFK's Inaugural Address, January 20, 1961, 12:11 EST",
     "here on earth God's work must truly be our own."),
    (7, "1990s Etext, CRLF, no footer", "The Mayflower Compact", "Edward Liester"),
    (11, "modern, BOM, CRLF", "[Illustration]", "THE END"),
    (74, "older THIS, no BOM, CRLF", "book first", "part of their lives at present."),
    (1184, "modern, LF, no BOM", "THE COUNT OF MONTE CRISTO", "[30] The miser in Molière’s comedy of _L’Avare_.—Ed."),
    (9198, "older THIS, latin-1", "THE COMPLETE ANGLER;", "FINIS."),
    (11563, "***START no space, ascii", "MORNING BELLS", "    If ever I loved Thee, my Saviour, 'tis now!\""),
    (26060, "older THIS, ascii", "  _Complete Version of ye_", "    These three Small Mice"),
]


@pytest.mark.parametrize("book_id,style,first_line,last_line", REAL_BOOKS)
def test_real_books_lose_pg_text_and_keep_body_ends(mirror_dir, book_id, style, first_line, last_line):
    raw = (mirror_dir / "cache" / "epub" / str(book_id) / f"pg{book_id}.txt").read_bytes()
    cleaned = clean_book(raw, MARKERS_ONLY)
    assert not PG_LINES.search(cleaned), style
    lines = cleaned.split("\n")
    assert lines[0] == first_line and lines[-1] == last_line, style
    assert "\r" not in cleaned and "\n\n\n" not in cleaned and "\ufeff" not in cleaned
    assert first_line in decode(raw).replace("\r\n", "\n")  # the expectation is really the book's


def test_real_books_language_decisions(mirror_dir):
    """With the catalog, the default filter keeps the English books and drops the others."""
    catalog = {e.book_id: e.languages for e in read_catalog(str(mirror_dir / "cache/epub/feeds/pg_catalog.csv"))}
    english = LanguageFilter(("en",), 0.9)
    decisions = {}
    for folder in sorted((mirror_dir / "cache" / "epub").iterdir()):
        if folder.name.isdigit():
            text = clean_book((folder / f"pg{folder.name}.txt").read_bytes())
            decisions[int(folder.name)] = english.rejection(text, catalog[int(folder.name)]) is None
    kept = {book_id for book_id, keep in decisions.items() if keep}
    assert kept == {book_id for book_id, languages in catalog.items() if "en" in languages and book_id in decisions}
    assert 2229 not in kept and 7000 not in kept and 9198 in kept  # German, Finnish out; Latin-1 English in
    # Without the catalog, the ASCII rule alone keeps most non-English Latin-script books, as in the reference.
    assert english.rejection(clean_book((mirror_dir / "cache/epub/2229/pg2229.txt").read_bytes()), None) is None
