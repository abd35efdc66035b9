"""Prose cleaning: transcriber artifacts out, hard-wrapped paragraphs joined into one line each.

Project Gutenberg's plain text keeps the line breaks of a ~70-column wrap or of the printed
page, so about one token in thirteen is a newline, and a model trained on it learns to emit
newlines. `unwrap_paragraphs` joins the lines of each prose paragraph and keeps, line for
line, what is laid out on purpose: verse, tables and tables of contents, lists, indented
blocks (letters, quotations, centred titles) and headings. It works one paragraph (a block of
lines between blank lines) at a time, with the book's layout measured first: its wrap width
(the 95th percentile length of flush-left lines in multi-line blocks) and whether it is
ragged (its prose lines end where a printed page ended them, not at the width).

  kept as it is   a block whose every line is indented by 2 or more spaces; a block whose
                  continuation lines are indented (verse, hanging indents); a block with a
                  column gap (3+ spaces or a tab inside a line other than the last); a block
                  whose line breaks do not look like wrapping (below)
  joined          the other blocks, into one line; a short heading line at the top and the
                  items of a list (2+ lines starting with a list marker, after a line that is
                  not full) stay lines of their own

A line break looks like wrapping when the next line starts with a lower-case letter (verse
and headings start lines with capitals); when the line is full (its length plus the next
line's first word passes the wrap width: the word could not have fitted); when the line ends
mid-sentence near the margin; or, in a ragged book, when it ends mid-sentence past half the
width. A block is prose when at least half of its breaks look like wrapping; with three or
more breaks and none before a lower-case word, every line must be full. A one-space indent
counts as none (PG's own wrapping moves the space after a closing quote to the next line). A
line that ends with a hyphen or a dash is joined without a space.

`remove_artifacts` drops what transcribers added to the text: `[Illustration...]`,
`[Frontispiece...]`, `[Sidenote...]` and `[Transcriber's note...]` tags (over several lines
too), page numbers such as `[Pg 12]`, the `_` around emphasised words, and, unless footnotes
are kept, `[Footnote ...]` blocks, note markers after words (`word[3]`, `word [3]`) and note
paragraphs (`[3] The note...`, with a `FOOTNOTES:` heading above them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Below this, a book's "wrap width" is not a wrap width: it is a book of short lines (verse).
MIN_WRAP_WIDTH = 55
# Greedy wrapping leaves at most a word's width free; this many columns of slack also count
# as full (the width is a percentile, a little under the longest lines, and files converted
# to curly quotes and accents after wrapping have lines a few characters shorter).
FULL_LINE_SLACK = 5
# A book is ragged when more than this share of its sure prose line breaks are not full.
RAGGED_SHARE = 0.1
# Lines sampled to measure a book's layout: plenty for a percentile, cheap for any book.
LAYOUT_SAMPLE_LINES = 3_000

_COLUMN_GAP = re.compile(r"\S(?: {3,}|\t)\S")
# What may stand before a line's first letter: quotes, brackets, dashes, ellipses.
_OPENING = " \t\"'“”‘’«»‹›([{_*—–-.…¡¿"
_LIST_MARKER = re.compile(
    r"^[^\S\n]*(?:[*•·–]|-(?!-)|\d{1,3}[.)]|\(\d{1,3}\)|\([a-zA-Z]\)|[a-z]\)|\([ivxlcdm]{1,6}\)|[ivxlcdm]{1,6}\.)\s",
    re.MULTILINE,
)
# The first letter of each line after the first, past quotes, brackets and dashes.
_LINE_START_LETTER = re.compile(r"\n[" + re.escape(_OPENING) + r"]*([^\W\d_])")
_DASH_BREAK = re.compile(r"([-—–])\n(?<=\S.\n)")  # a line ending in a word's hyphen or a dash
_HEADING_WORD = re.compile(r"(CHAPTER|BOOK|PART|STAVE|SECTION|CANTO|ACT|SCENE|VOLUME|LETTER)\b", re.IGNORECASE)
_DASHES = ("-", "—", "–")
_SENTENCE_END = re.compile(r"[.!?:;]['\"’”)\]]*\s*$")

# Every artifact pattern starts with a literal or a character set, so that the regex engine
# skips to candidates instead of trying each position of a multi-megabyte book.
# A bracketed tag's body after its name: `]`, or `:`/`.` and text up to the closing bracket,
# over several lines, with one level of brackets inside ([Illustration: a [Greek] word]).
_TAG_BODY = r"(?:\s*\d+)?(?:[:.](?:[^\[\]]|\[[^\[\]]*\])*)?\]"
_TRANSCRIBER_TAG = re.compile(
    r"\[(?:Illustrations?|Frontispiece|Sidenote|Transcriber['’]?s?\s+Notes?)" + _TAG_BODY, re.IGNORECASE
)
_PAGE_NUMBER = re.compile(r"[\[{](?i:pg|page|p\.)(?:\s*\d+|\s+(?i:[ivxlcdm]+))[\]}]")
_FOOTNOTE_BLOCK = re.compile(r"\[Footnote" + _TAG_BODY, re.IGNORECASE)
# A note marker: [3], [A], [*], [†], not followed by a word ([I]t is an editor's capital).
_FOOTNOTE_MARKER = re.compile(r"\[(?:\d{1,3}|[A-Z]|\*{1,3}|†)\](?![\w\[])")
_NOTE_PARAGRAPH = re.compile(r"\[\d{1,3}\] ")  # "[12] The text of the note..."
_NOTES_HEADING = re.compile(r"(?:FOOT)?NOTES?:?", re.IGNORECASE)
# `_` that opens (after a non-word, before text) or closes (after text, before a non-word) an
# emphasis; `snake_case`, `____` rules and a lone `_` between spaces stay.
_EMPHASIS = re.compile(r"_(?:(?<![\w_]_)(?=[^\s_])|(?<=[^\s_]_)(?![\w_]))")


def remove_artifacts(text: str, drop_footnotes: bool = True) -> str:
    """Text without transcriber tags, page numbers, emphasis underscores and, with
    `drop_footnotes`, footnotes. Expects paragraphs separated by one blank line; leaves blank
    lines where tags stood alone: collapse them afterwards."""
    text = _cut(text, _TRANSCRIBER_TAG)
    text = _cut(text, _PAGE_NUMBER)
    if drop_footnotes:
        text = _cut(text, _FOOTNOTE_BLOCK)
        text = _drop_note_paragraphs(text)
        text = _cut(text, _FOOTNOTE_MARKER, _is_note_marker)
    return _EMPHASIS.sub("", text)


def _cut(text: str, pattern: re.Pattern, wanted=None) -> str:
    """`text` without the matches of `pattern` (those `wanted(text, match)` accepts), each with
    the spaces before it, so that `word [3] more` becomes `word more`."""
    pieces, end = [], 0
    for match in pattern.finditer(text):
        if wanted is None or wanted(text, match):
            pieces.append(text[end : match.start()].rstrip(" \t"))
            end = match.end()
    return "".join(pieces) + text[end:] if pieces else text


def _is_note_marker(text: str, match: re.Match) -> bool:
    """`word[3]`, `word.[A]`: right after text; `word [3]`: a number before a space or punctuation."""
    before = text[match.start() - 1 : match.start()]
    if before and not before.isspace():
        return before != "["
    after = text[match.end() : match.end() + 1]
    return bool(before) and match[0][1:-1].isdigit() and (not after or after in " \t\n.,;:!?)]”’\"'")


def _drop_note_paragraphs(text: str) -> str:
    """Drop paragraphs that are notes, "[12] The note...", and the NOTES heading above them."""
    if "\n[" not in text and not text.startswith("["):
        return text
    paragraphs = text.split("\n\n")
    is_note = [bool(_NOTE_PARAGRAPH.match(p)) for p in paragraphs] + [False]
    kept = [
        p for i, p in enumerate(paragraphs)
        if not is_note[i] and not (is_note[i + 1] and _NOTES_HEADING.fullmatch(p))
    ]
    return "\n\n".join(kept)


def unwrap_paragraphs(text: str) -> str:
    """Join the hard-wrapped lines of each prose paragraph (see the module docstring).

    Expects collapsed blank lines: paragraphs separated by exactly one blank line."""
    blocks = text.split("\n\n")
    layout = book_layout(blocks)
    return "\n\n".join(_unwrap_block(block, layout) if "\n" in block else block for block in blocks)


@dataclass(frozen=True)
class Layout:
    width: int  # the wrap width: the 95th percentile length of flush-left lines in multi-line blocks
    ragged: bool  # prose lines end where a printed page ended them, not where the width did


def book_layout(blocks: list[str]) -> Layout:
    """The book's layout, measured on (a sample of) its flush-left multi-line blocks."""
    candidates = [block for block in blocks if "\n" in block and block[:1].strip()]
    stride = max(1, sum(block.count("\n") + 1 for block in candidates) // LAYOUT_SAMPLE_LINES)
    sample = [block.split("\n") for block in candidates[::stride]]
    lengths = sorted(len(line) for lines in sample for line in lines if line[:1].strip())
    if not lengths:
        return Layout(MIN_WRAP_WIDTH, ragged=False)
    width = max(MIN_WRAP_WIDTH, lengths[int(0.95 * (len(lengths) - 1))])
    # Breaks before a lower-case word are prose for sure: how often is the line not full there?
    prose = [(a, b) for lines in sample for a, b in zip(lines, lines[1:]) if _starts_lower(b)]
    short = sum(not _is_full(a, b, width) for a, b in prose)
    return Layout(width, ragged=short > RAGGED_SHARE * max(1, len(prose)))


def _unwrap_block(block: str, layout: Layout) -> str:
    lines = None  # split only when a test needs the lines: most blocks are plain prose
    if block[:1] == " " or "\n " in block:
        lines = block.split("\n")
        # A one-space indent is no indent: a transcription slip, or the space after a closing
        # quote that PG's own wrapping carried over to the next line (`”\n said he`).
        indents = [0 if indent == 1 else indent for indent in map(_indent, lines)]
        if min(indents) >= 2:
            return block  # an indented block: verse, a letter, a quotation, a centred title
        if any(indents[1:]):
            return block  # indented continuation lines: verse, hanging indents
    if "   " in block or "\t" in block:
        lines = lines or block.split("\n")
        if any(_COLUMN_GAP.search(line) for line in lines[:-1]):
            return block  # columns: a table, a table of contents
    breaks = block.count("\n")
    lower = sum(letter.islower() for letter in _LINE_START_LETTER.findall(block))
    # Enough breaks before a lower-case word make a block prose without measuring its lines.
    if 2 * lower < breaks and not _is_prose(lines or block.split("\n"), lower, layout):
        return block  # verse, headings, a list of short lines
    first, second = block.split("\n", 2)[:2]
    heading = (
        _is_heading(first, layout.width) and not _is_full(first, second, layout.width) and not _starts_lower(second)
    )
    markers = len(_LIST_MARKER.findall(block))
    if not heading and markers < 2:
        # Plain prose, the common case: whole-block string operations instead of a line loop.
        if lines is not None or " \n" in block:
            block = "\n".join(line.strip() for line in lines or block.split("\n"))
        if "-\n" in block or "—\n" in block or "–\n" in block:
            block = _DASH_BREAK.sub(r"\1", block)
        return block.replace("\n", " ")
    lines = lines or block.split("\n")
    out = [lines[0].strip()]
    for index, (before, after) in enumerate(zip(lines, lines[1:])):
        new_item = markers >= 2 and _LIST_MARKER.match(after) and not _is_full(before, after, layout.width)
        if (index == 0 and heading) or new_item:
            out.append(after.strip())
        elif _ends_with_dash(out[-1]):
            out[-1] += after.strip()
        else:
            out[-1] += " " + after.strip()
    return block if len(out) == len(lines) else "\n".join(out)


def _is_prose(lines: list[str], lower: int, layout: Layout) -> bool:
    """Whether at least half of the line breaks look like wrapping; with three or more breaks
    and none before a lower-case word (`lower` counts those), every line must be full."""
    pairs = list(zip(lines, lines[1:]))
    full = [_is_full(before, after, layout.width) for before, after in pairs]
    if len(pairs) >= 3 and not lower and not all(full):
        return False
    wrapped = sum(
        fits or _starts_lower(after) or _mid_sentence(before, layout) for (before, after), fits in zip(pairs, full)
    )
    return 2 * wrapped >= len(pairs)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _starts_lower(line: str) -> bool:
    return line.lstrip(_OPENING)[:1].islower()


def _is_full(before: str, after: str, width: int) -> bool:
    """Whether `after`'s first word could not have fitted at the end of `before`."""
    after = after.lstrip()
    space = after.find(" ")
    word = len(after) if space < 0 else space
    return len(before) + (not _ends_with_dash(before)) + word > width - FULL_LINE_SLACK


def _mid_sentence(before: str, layout: Layout) -> bool:
    """A break mid-sentence that looks like wrapping although the next word would have fitted:
    near the margin after a word (wrapped by another count of characters), or, in a ragged
    book, anywhere past half the width."""
    if len(before) >= 0.75 * layout.width and before[-1:].isalnum():
        return True
    return layout.ragged and 2 * len(before) >= layout.width and not _SENTENCE_END.search(before)


def _is_heading(line: str, width: int) -> bool:
    """A short line that names a chapter (CHAPTER IV, STAVE ONE) or has no lower-case letter."""
    text = line.strip()
    return len(text) <= width // 2 and (bool(_HEADING_WORD.match(text)) or not any(c.islower() for c in text))


def _ends_with_dash(line: str) -> bool:
    """`well-` / `said—` (a word broken at its hyphen, a dash), not ` -` (a dash between spaces)."""
    return line.endswith(_DASHES) and not line[-2:-1].isspace()
