"""Raw Project Gutenberg file -> the clean text the model trains on.

Steps, in order: normalise line endings, cut the PG header and footer, decode (UTF-8 with
or without BOM, else Latin-1), collapse runs of blank lines (the reference's
`re.sub(r'\\n\\s*\\n', '\\n\\n', text)`), then drop the PG paragraphs that sit between the
markers and the body (producer credits, "The Project Gutenberg Etext of ..."). Then, as
`CleanOptions` say (all on by default), prose cleaning (prose.py): transcriber artifacts
removed, hard-wrapped paragraphs joined.

The first two steps work on bytes: markers are ASCII, and both encodings PG uses are
ASCII-compatible (a newline byte never sits inside a UTF-8 character), so cutting before
decoding is exact, and finding ASCII words in bytes is several times faster than in a
decoded (often UCS-2) string.

PG files in the wild use several marker styles (tests/test_clean.py has one of each):
  modern  `*** START OF THE PROJECT GUTENBERG EBOOK TITLE ***` ... `*** END OF THE ... ***`
  older   `*** START OF THIS PROJECT GUTENBERG EBOOK`, `***START OF THE ...` (no space),
          `End of Project Gutenberg's TITLE` / `End of the Project Gutenberg EBook of ...`
  1990s   "Project Gutenberg Etext" header whose legal "SMALL PRINT" ends with
          `*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*...`; no START marker, and often
          no footer, or one starting `*END OF THE PROJECT GUTENBERG ETEXT ...`.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

from gptrain.data.prose import remove_artifacts, unwrap_paragraphs
from gptrain.errors import GptrainError

FOOTNOTE_MODES = ("drop", "keep")

# Marker patterns match a whole line from its start, ignoring case.
# A line that ends the header: everything up to and including it is PG's.
_HEADER_END = re.compile(rb"\W*\*\s*START OF (THE|THIS) PROJECT GUTENBERG E-?(BOOK|TEXT)", re.IGNORECASE)
# The 1990s header ends with its legal small print; such files have no START marker.
_SMALL_PRINT_END = re.compile(rb"\W*END\W*THE SMALL PRINT", re.IGNORECASE)
# `*** END OF THE PROJECT GUTENBERG EBOOK ...`, `End of Project Gutenberg's TITLE`, ...
_END_OF_BOOK = re.compile(rb"\W*END OF (THE |THIS )?PROJECT GUTENBERG", re.IGNORECASE)
# A line that starts the footer: it and everything after it are PG's.
_FOOTER_START = re.compile(
    _END_OF_BOOK.pattern
    + rb"|\W*START: FULL LICENSE"
    + rb"|\W*START\W*THE SMALL PRINT",  # files that carry the 1990s small print at the end
    re.IGNORECASE,
)
# Every marker line holds one of these words (PG writes them in these cases).
_MARKER_WORDS = (b"utenberg", b"UTENBERG", b"SMALL PRINT", b"FULL LICENSE")

# Paragraphs between a marker and the body that belong to PG, not to the book: mentions of
# PG or of 1990s "etexts" anywhere in them, or producer credits and lines of asterisks.
_PG_MENTION = re.compile(r"project\s+gutenberg|\betexts?\b", re.IGNORECASE)
_CREDIT_OR_RULE = re.compile(r"\W*(e-?text\s+)?(produced|prepared|transcribed)\b[^\n]*\bby\b|[\s*]*$", re.IGNORECASE)
# The reference's r"\n\s*\n" with at least one character between the newlines: the same
# replacements, minus the no-op ones of every "\n\n" already in place (half the time).
_BLANK_RUN = re.compile(r"\n\s+\n")
_LEADING_BLANK_LINES = re.compile(r"\A\s*\n")


@dataclass(frozen=True)
class CleanOptions:
    """How far `clean_book` goes past cutting PG's header and footer (recorded in the manifest)."""

    unwrap: bool = True  # join hard-wrapped prose paragraphs into one line each (prose.py)
    artifacts: bool = True  # remove transcriber tags, page numbers and `_` emphasis marks
    footnotes: str = "drop"  # with artifacts: "drop" footnotes and their markers, or "keep" them

    def __post_init__(self) -> None:
        if self.footnotes not in FOOTNOTE_MODES:
            raise GptrainError(f"footnotes must be one of {', '.join(FOOTNOTE_MODES)}, got {self.footnotes!r}")


# Only PG's header, footer and credits removed: the book's text as PG has it.
MARKERS_ONLY = CleanOptions(unwrap=False, artifacts=False)


def clean_book(data: bytes, options: CleanOptions = CleanOptions()) -> str:
    """Raw bytes of a PG file -> clean body text ('' when nothing is left)."""
    text = collapse_blank_lines(decode(strip_markers(normalise_newlines(data))))
    text = _strip_blank_lines(drop_boilerplate_paragraphs(text))
    if options.artifacts:
        text = _strip_blank_lines(collapse_blank_lines(remove_artifacts(text, drop_footnotes=options.footnotes == "drop")))
    return unwrap_paragraphs(text) if options.unwrap else text


def decode(data: bytes) -> str:
    """UTF-8 (a BOM is dropped), else Latin-1, which decodes any byte string.

    Latin-1 is the right fallback for PG: its 8-bit files (`-8.txt`) say
    `Character set encoding: ISO-8859-1`, and a UTF-8 file never fails to decode.
    """
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def normalise_newlines(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n") if b"\r" in data else data


def strip_markers(data: bytes) -> bytes:
    """The bytes between PG's header and footer (all of them when there are none)."""
    lines = _marker_word_lines(data)

    def first_line(pattern: re.Pattern, start: int = 0, end: int = len(data)) -> tuple[int, int] | None:
        return next(((s, e) for s, e in lines if start <= s < end and pattern.match(data, s, e)), None)

    header = first_line(_HEADER_END)
    if header is None:
        # A small print is the header only when no end-of-book line precedes it: some
        # files carry it after the book instead.
        small_print = first_line(_SMALL_PRINT_END)
        if small_print is not None and first_line(_END_OF_BOOK, end=small_print[0]) is None:
            header = small_print
    start = min(header[1] + 1, len(data)) if header is not None else 0
    footer = first_line(_FOOTER_START, start)
    return data[start : footer[0] if footer is not None else len(data)]


def collapse_blank_lines(text: str) -> str:
    return _BLANK_RUN.sub("\n\n", text)


def drop_boilerplate_paragraphs(text: str) -> str:
    """Drop PG paragraphs at either end of the body; stop at the first paragraph that is not.

    Expects collapsed blank lines, so paragraphs are separated by exactly "\\n\\n".
    """
    text = _strip_blank_lines(text)
    start, end = 0, len(text)
    while start < end:
        stop = text.find("\n\n", start, end)
        stop = end if stop < 0 else stop
        if not _is_boilerplate(text, start, stop):
            break
        start = stop + 2
    while end > start:
        separator = text.rfind("\n\n", start, end)
        begin = start if separator < 0 else separator + 2
        if not _is_boilerplate(text, begin, end):
            break
        end = begin - 2
    return text[start : max(start, end)]


def ascii_fraction(text: str) -> float:
    if not text:
        return 0.0
    return len(text.encode("ascii", "ignore")) / len(text)


@dataclass(frozen=True)
class LanguageFilter:
    """Which books count as English (or whatever `languages` says).

    Two tests, both configurable: the reference's rule, share of ASCII characters above
    `min_ascii_fraction` (0 turns it off), and, when the catalog lists the book's
    languages, at least one of them in `languages` (empty: any language).
    """

    languages: tuple[str, ...] = ("en",)
    min_ascii_fraction: float = 0.9

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_ascii_fraction <= 1.0:
            raise GptrainError(f"min_ascii_fraction must be within [0, 1], got {self.min_ascii_fraction}")

    def rejection(self, text: str, catalog_languages: tuple[str, ...] | None) -> str | None:
        """Why the book is dropped, or None to keep it."""
        if self.languages and catalog_languages and not set(catalog_languages) & set(self.languages):
            return f"catalog language {'; '.join(catalog_languages)} not in {','.join(self.languages)}"
        if self.min_ascii_fraction > 0:
            share = ascii_fraction(text)
            if share <= self.min_ascii_fraction:
                return f"ASCII share {share:.3f} <= {self.min_ascii_fraction}"
        return None


def _marker_word_lines(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of every line that holds a marker word, in order: the only lines a
    marker pattern can match. One bytes.find pass per word is far faster than running a
    case-insensitive multi-line regex over the book, which tries every position."""
    starts = set()
    for word in _MARKER_WORDS:
        at = data.find(word)
        while at >= 0:
            starts.add(data.rfind(b"\n", 0, at) + 1)
            at = data.find(word, at + len(word))
    lines = []
    for start in sorted(starts):
        end = data.find(b"\n", start)
        lines.append((start, len(data) if end < 0 else end))
    return lines


def _is_boilerplate(text: str, start: int, end: int) -> bool:
    return bool(_PG_MENTION.search(text, start, end) or _CREDIT_OR_RULE.match(text, start, end))


def _strip_blank_lines(text: str) -> str:
    """Drop blank lines at both ends but keep the first line's indentation (verse, titles)."""
    return _LEADING_BLANK_LINES.sub("", text).rstrip()
