"""The Project Gutenberg catalog: parse `pg_catalog.csv` and choose which books to use.

gutenberg.org publishes the catalog at `cache/epub/feeds/pg_catalog.csv`: RFC-4180 CSV,
UTF-8, one row per ebook, header `Text#,Type,Issued,Title,Language,Authors,Subjects,LoCC,
Bookshelves`, about 75,000 rows (parsed in about a second). Quoted fields may span lines
(multi-line titles) and `Language` may list several codes (`en; es; tl`). `Type` tells texts
from audio books (`Sound`) and others. `Selection` chooses books by language, type, subject
and bookshelf substrings and id ranges.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from gptrain import storage
from gptrain.errors import GptrainError

# Where a mirror of gutenberg.org keeps the catalog, relative to the mirror's base URL.
CATALOG_PATH = "cache/epub/feeds/pg_catalog.csv"

# The columns we use; PG may append columns, so we look them up by name, not position.
REQUIRED_COLUMNS = ("Text#", "Type", "Issued", "Title", "Language", "Authors")
OPTIONAL_COLUMNS = ("Subjects", "Bookshelves")  # empty when a catalog lacks them

TEXT_TYPE = "Text"


@dataclass(frozen=True)
class CatalogEntry:
    book_id: int
    type: str
    title: str
    languages: tuple[str, ...]
    authors: str
    issued: str
    subjects: str = ""  # "; "-separated Library of Congress subject headings
    bookshelves: str = ""  # "; "-separated PG bookshelves


@dataclass(frozen=True)
class Selection:
    """Which catalog rows to use: all the given tests must pass."""

    languages: tuple[str, ...] = ("en",)  # any of them among the book's languages
    types: tuple[str, ...] = (TEXT_TYPE,)  # the row's Type, e.g. Text (not Sound)
    subjects: tuple[str, ...] = ()  # when given: any of these substrings in Subjects (ignoring case)
    bookshelves: tuple[str, ...] = ()  # when given: any of these substrings in Bookshelves (ignoring case)
    id_ranges: tuple[tuple[int, int], ...] = ()  # when given: the id within one of these (inclusive) ranges

    def __post_init__(self) -> None:
        if not self.languages or not self.types:
            raise GptrainError("a selection needs at least one language and one type")
        bad = [f"{low}-{high}" for low, high in self.id_ranges if low > high]
        if bad:
            raise GptrainError(f"id range {', '.join(bad)}: the first id must not be above the last")

    def matches(self, entry: CatalogEntry) -> bool:
        return (
            entry.type in self.types
            and not set(self.languages).isdisjoint(entry.languages)
            and _any_in(self.subjects, entry.subjects)
            and _any_in(self.bookshelves, entry.bookshelves)
            and (not self.id_ranges or any(low <= entry.book_id <= high for low, high in self.id_ranges))
        )


def _any_in(needles: tuple[str, ...], field: str) -> bool:
    if not needles:
        return True
    field = field.casefold()
    return any(needle.casefold() in field for needle in needles)


def parse_id_range(text: str) -> tuple[int, int]:
    """`100-200` -> (100, 200); `7` -> (7, 7)."""
    low, _, high = text.partition("-")
    try:
        return int(low), int(high or low)
    except ValueError as err:
        raise GptrainError(f"id range {text!r}: expected FIRST-LAST, e.g. 1-1000") from err


def parse_languages(spec: str) -> tuple[str, ...]:
    """`"en, es"` -> `("en", "es")`: the language codes a user asked for (lower case)."""
    languages = tuple(dict.fromkeys(code.strip().lower() for code in spec.split(",") if code.strip()))
    if not languages:
        raise GptrainError(f"languages {spec!r}: give at least one language code, e.g. 'en' or 'en,de'")
    return languages


def parse_catalog(data: bytes, source: str) -> list[CatalogEntry]:
    """Parse catalog CSV bytes; `source` (a URL or path) names the catalog in errors."""
    try:
        # utf-8-sig: tolerate a BOM in case a mirror re-saved the file with one.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise GptrainError(f"{source}: not a Project Gutenberg catalog (not UTF-8 text: {err})") from err
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, [])
        column = _column_indexes(header, source)
        entries = [_entry(row, column, source, reader.line_num) for row in reader if any(row)]
    except csv.Error as err:
        raise GptrainError(f"{source}: malformed CSV near line {reader.line_num}: {err}") from err
    return entries


def read_catalog(url: str) -> list[CatalogEntry]:
    """Read a catalog CSV from a local path or fsspec URL, e.g. `RAW_DIR/catalog.csv`."""
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError as err:
        raise GptrainError(f"{url}: catalog file not found") from err
    return parse_catalog(data, url)


def select_books(entries: list[CatalogEntry], selection: Selection) -> list[CatalogEntry]:
    """The rows `selection` matches (a multi-language book counts for each language), by id."""
    return sorted((e for e in entries if selection.matches(e)), key=lambda e: e.book_id)


def _column_indexes(header: list[str], source: str) -> dict[str, int]:
    names = [name.strip() for name in header]
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        shown = ",".join(names)[:120] or "(empty file)"
        raise GptrainError(
            f"{source}: not a Project Gutenberg catalog: header {shown!r} lacks column(s) {', '.join(missing)}"
        )
    return {name: names.index(name) for name in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if name in names}


def _entry(row: list[str], column: dict[str, int], source: str, line: int) -> CatalogEntry:
    needed = max(column[name] for name in REQUIRED_COLUMNS) + 1
    if len(row) < needed:
        raise GptrainError(f"{source}: line {line}: expected at least {needed} fields, got {len(row)}")
    raw_id = row[column["Text#"]].strip()
    try:
        book_id = int(raw_id)
    except ValueError as err:
        raise GptrainError(f"{source}: line {line}: Text# {raw_id!r} is not a book number") from err
    language_field = row[column["Language"]]
    return CatalogEntry(
        book_id=book_id,
        type=row[column["Type"]].strip(),
        title=row[column["Title"]].strip(),
        languages=tuple(code.strip().lower() for code in language_field.split(";") if code.strip()),
        authors=row[column["Authors"]].strip(),
        issued=row[column["Issued"]].strip(),
        subjects=_optional(row, column, "Subjects"),
        bookshelves=_optional(row, column, "Bookshelves"),
    )


def _optional(row: list[str], column: dict[str, int], name: str) -> str:
    index = column.get(name)
    return row[index].strip() if index is not None and index < len(row) else ""
