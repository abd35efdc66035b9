"""The Project Gutenberg catalog: parse `pg_catalog.csv` and choose which books to use.

gutenberg.org publishes the catalog at `cache/epub/feeds/pg_catalog.csv`: RFC-4180 CSV,
UTF-8, one row per ebook, header `Text#,Type,Issued,Title,Language,Authors,Subjects,LoCC,
Bookshelves`. Quoted fields may span lines (multi-line titles) and `Language` may list
several codes (`en; es; tl`). `Type` tells texts from audio books (`Sound`) and others.
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

TEXT_TYPE = "Text"


@dataclass(frozen=True)
class CatalogEntry:
    book_id: int
    type: str
    title: str
    languages: tuple[str, ...]
    authors: str
    issued: str


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


def select_books(entries: list[CatalogEntry], languages: tuple[str, ...]) -> list[CatalogEntry]:
    """Texts in any of `languages` (a multi-language book counts for each), sorted by id."""
    wanted = set(languages)
    chosen = [e for e in entries if e.type == TEXT_TYPE and wanted.intersection(e.languages)]
    return sorted(chosen, key=lambda e: e.book_id)


def _column_indexes(header: list[str], source: str) -> dict[str, int]:
    names = [name.strip() for name in header]
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        shown = ",".join(names)[:120] or "(empty file)"
        raise GptrainError(
            f"{source}: not a Project Gutenberg catalog: header {shown!r} lacks column(s) {', '.join(missing)}"
        )
    return {name: names.index(name) for name in REQUIRED_COLUMNS}


def _entry(row: list[str], column: dict[str, int], source: str, line: int) -> CatalogEntry:
    needed = max(column.values()) + 1
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
    )
