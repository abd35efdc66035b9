"""Synthetic Project Gutenberg files, one per marker style and encoding the data pipeline meets.

Each builder wraps a body in that style's real header and footer wording (abridged), so the
tests know the exact body the cleaner must return.
"""

from __future__ import annotations

import csv
import io
import random
import textwrap
from pathlib import Path

WORDS = (
    "the of and to a in that it was he for on are as with his they at be this from have or by one had not "
    "but what all were when we there can an your which their said if do will each about how up out them "
    "then she many some so these would other into has more her two like him see time could no make than "
    "first been its who now people my made over did down only way find use may water long little very "
    "after words called just where most know river house garden letter morning evening window road"
).split()


def body(book_id: int, paragraphs: int = 6, seed_words: tuple[str, ...] = WORDS) -> str:
    """A deterministic body whose first and last paragraphs name the book, its prose
    paragraphs hard-wrapped at 70 columns like PG's."""
    rng = random.Random(book_id)
    middle = []
    for _ in range(paragraphs):
        sentences = rng.randint(2, 5)
        text = " ".join(" ".join(rng.choice(seed_words) for _ in range(12)).capitalize() + "." for _ in range(sentences))
        middle.append(textwrap.fill(text, 70))
    return "\n\n".join([f"Chapter I. How book {book_id} begins.", *middle, f"So ends book {book_id}, and all is well."])


def unwrapped(text: str) -> str:
    """`text` with each paragraph on one line: what prepare's cleaning makes of a `body`."""
    return "\n\n".join(paragraph.replace("\n", " ") for paragraph in text.split("\n\n"))


def modern(book_id: int, text: str, title: str = "A Test Book") -> str:
    return (
        f"The Project Gutenberg eBook of {title}\n    \n"
        "This ebook is for the use of anyone anywhere in the United States and\n"
        "most other parts of the world at no cost and with almost no restrictions\n"
        "whatsoever. You may copy it, give it away or re-use it under the terms\n"
        "of the Project Gutenberg License included with this ebook or online\n"
        "at www.gutenberg.org.\n\n"
        f"Title: {title}\n\nAuthor: A. Writer\n\n"
        f"Release date: June 27, 2008 [eBook #{book_id}]\n\nLanguage: English\n\n\n"
        f"*** START OF THE PROJECT GUTENBERG EBOOK {title.upper()} ***\n"
        f"{text}\n\n\n\n"
        f"*** END OF THE PROJECT GUTENBERG EBOOK {title.upper()} ***\n\n    \n\n"
        "Updated editions will replace the previous one—the old editions will\nbe renamed.\n\n"
        "START: FULL LICENSE\n\nTHE FULL PROJECT GUTENBERG LICENSE\n"
        "PLEASE READ THIS BEFORE YOU DISTRIBUTE OR USE THIS WORK\n"
    )


def older(book_id: int, text: str, title: str = "A Test Book") -> str:
    """2000s style: `*** START OF THIS ...`, producer credit, `End of Project Gutenberg's ...`."""
    return (
        f"The Project Gutenberg EBook of {title}, by A. Writer\n\n"
        "This eBook is for the use of anyone anywhere at no cost and with\n"
        "almost no restrictions whatsoever.  You may copy it, give it away or\n"
        "re-use it under the terms of the Project Gutenberg License included\n"
        "with this eBook or online at www.gutenberg.net\n\n\n"
        f"Title: {title}\n\nRelease Date: May 1, 2004 [EBook #{book_id}]\n\n"
        "Language: English\n\nCharacter set encoding: ISO-8859-1\n\n"
        f"*** START OF THIS PROJECT GUTENBERG EBOOK {title.upper()} ***\n\n\n\n\n"
        "Produced by Jane Doe and the Online Distributed\nProofreading Team at http://www.pgdp.net\n\n\n\n\n"
        f"{text}\n\n\n\n\n\n"
        f"End of Project Gutenberg's {title}, by A. Writer\n\n"
        f"*** END OF THIS PROJECT GUTENBERG EBOOK {title.upper()} ***\n\n"
        f"***** This file should be named {book_id}.txt or {book_id}.zip *****\n"
        "This and all associated files of various formats will be found in:\n"
        f"        http://www.gutenberg.org/{book_id}/\n"
    )


def no_space(book_id: int, text: str, title: str = "A Test Book") -> str:
    """`***START OF THE PROJECT GUTENBERG EBOOK X***` (no spaces), an E-text credit line."""
    return (
        f"The Project Gutenberg EBook of {title}\n\n"
        f"Release Date: March 9, 2004 [EBook #{book_id}]\n\nLanguage: English\n\n"
        f"***START OF THE PROJECT GUTENBERG EBOOK {title.upper()}***\n\n\n\n\n"
        "E-text prepared by Project Gutenberg Distributed Proofreaders\n\n\n\n\n"
        f"{text}\n\n\n\n\n\n"
        f"End of the Project Gutenberg EBook of {title}\n\n"
        f"***END OF THE PROJECT GUTENBERG EBOOK {title.upper()}***\n\n"
        f"******* This file should be named {book_id}.txt or {book_id}.zip *******\n"
    )


_SMALL_PRINT = (
    "***START**THE SMALL PRINT!**FOR PUBLIC DOMAIN ETEXTS**START***\n"
    'Why is this "Small Print!" statement here?  You know: lawyers.\n'
    "They tell us you might sue us if there is something wrong with\n"
    "your copy of this etext, even if you got it for free.\n\n"
    "INDEMNITY\nYou will indemnify and hold the Project, its directors,\n"
    "officers, members and agents harmless from all liability.\n\n"
    "This \"Small Print!\" by Charles B. Kramer, Attorney\n"
    "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n"
)


def etext_1990s(book_id: int, text: str, title: str = "A Test Book", footer: bool = False) -> str:
    """The 1990s "Etext" header with the legal small print; no START marker, footer optional."""
    return (
        "**Welcome To The World of Free Plain Vanilla Electronic Texts**\n\n"
        "**Etexts Readable By Both Humans and By Computers, Since 1971**\n\n"
        "*These Etexts Prepared By Hundreds of Volunteers and Donations*\n\n\n"
        f"**The Project Gutenberg Etext of {title}**\n"
        f"*******This file should be named test{book_id}.txt*******\n\n"
        f"[Etext #{book_id}] November 22, 1973\n\n"
        "We apologize for the fact that the legal small print is longer,\n"
        "and more complicated, than the Etext itself.\n\n"
        f"{_SMALL_PRINT}\n\n"
        "All of the original Project Gutenberg Etexts from the\n"
        "1970's were produced in ALL CAPS, no lower case.\n\n"
        "***\n\n\n"
        f"***The Project Gutenberg Etext of {title}**\n\n"
        f"{text}\n\n"
        + (f"\n*END OF THE PROJECT GUTENBERG ETEXT OF {title.upper()}*\n" if footer else "")
    )


def write_catalog(path: Path, rows: dict[int, str]) -> None:
    """A pg_catalog.csv with these books' languages ({id: 'en' or 'en; es'})."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["Text#", "Type", "Issued", "Title", "Language", "Authors", "Subjects", "LoCC", "Bookshelves"])
    for book_id, language in sorted(rows.items()):
        writer.writerow([book_id, "Text", "2004-05-01", f"Book {book_id}", language, "A. Writer", "", "", ""])
    path.write_text(out.getvalue(), encoding="utf-8")


GERMAN = (
    "Habe nun, ach! Philosophie, Juristerei und Medizin, und leider auch Theologie durchaus studiert, "
    "mit heißem Bemühn. Da steh ich nun, ich armer Tor! Und bin so klug als wie zuvor."
)
GREEK = "Μῆνιν ἄειδε θεὰ Πηληϊάδεω Ἀχιλῆος οὐλομένην, ἣ μυρί᾽ Ἀχαιοῖς ἄλγε᾽ ἔθηκε."


def raw_dir(root: Path, extra_books: int = 0, paragraphs: int = 6) -> dict[int, str]:
    """RAW_DIR with one book per style and encoding; returns {book_id: expected clean text}
    (paragraphs unwrapped) for the books prepare must keep. `extra_books` adds modern-style
    books 1000, 1001, ..."""
    books = root / "books"
    books.mkdir(parents=True)
    expected: dict[int, str] = {}

    def put(book_id: int, data: bytes, keep_text: str | None) -> None:
        (books / f"pg{book_id}.txt").write_bytes(data)
        if keep_text is not None:
            expected[book_id] = unwrapped(keep_text)

    crlf = lambda s: s.replace("\n", "\r\n")  # noqa: E731
    put(11, b"\xef\xbb\xbf" + crlf(modern(11, body(11, paragraphs))).encode(), body(11, paragraphs))
    put(12, modern(12, body(12, paragraphs)).encode(), body(12, paragraphs))
    latin = body(13, paragraphs).replace("begins.", "begins at the caf\u00e9 na\u00efve.")
    put(13, crlf(older(13, latin)).encode("latin-1"), latin)
    put(14, no_space(14, body(14, paragraphs)).encode(), body(14, paragraphs))
    put(15, crlf(etext_1990s(15, body(15, paragraphs))).encode(), body(15, paragraphs))
    put(16, etext_1990s(16, body(16, paragraphs), footer=True).encode(), body(16, paragraphs))
    put(17, modern(17, "\n\n   \n\n").encode(), None)  # empty after cleaning
    put(18, modern(18, "\n\n".join([GERMAN] * paragraphs)).encode(), None)  # catalog says German
    put(19, modern(19, "\n\n".join([GREEK] * paragraphs)).encode(), None)  # not in the catalog, not ASCII
    for book_id in range(1000, 1000 + extra_books):
        put(book_id, modern(book_id, body(book_id, paragraphs)).encode(), body(book_id, paragraphs))
    catalog = {book_id: "en" for book_id in expected} | {17: "en", 18: "de"}
    write_catalog(root / "catalog.csv", catalog)
    return expected


def plant_duplicates(mirror: Path, books: Path, val_fraction: float, seed: int = 0) -> dict[int, int]:
    """Other editions of the shared mirror's books, as PG holds them, written to `books`:
    re-wrapped, re-encoded (Latin-1), under another header style, in capitals, split in two
    volumes. Each gets an id whose split differs from its original's, so without dedup the
    work would sit on both sides. Returns {planted id: original id}."""
    from gptrain.data.clean import MARKERS_ONLY, clean_book
    from gptrain.data.prepare import split_of

    def body_of(book_id: int) -> str:
        return clean_book((mirror / "cache" / "epub" / str(book_id) / f"pg{book_id}.txt").read_bytes(), MARKERS_ONLY)

    planted: dict[int, int] = {}

    def put(original: int, data: bytes) -> None:
        book_id = 90_000 + 100 * len(planted)
        while split_of(book_id, val_fraction, seed) == split_of(original, val_fraction, seed):
            book_id += 1
        (books / f"pg{book_id}.txt").write_bytes(data)
        planted[book_id] = original

    alice = "\n\n".join(textwrap.fill(p, 60) for p in body_of(11).split("\n\n"))
    put(11, modern(0, alice, "Alice").encode())  # re-wrapped at 60 columns
    quotes = str.maketrans({"’": "'", "‘": "'", "“": '"', "”": '"', "—": "--"})
    holmes = older(0, body_of(1661).translate(quotes), "Adventures")
    put(1661, holmes.replace("\n", "\r\n").encode("latin-1", "replace"))  # 8-bit, CRLF, 2000s header
    put(35, etext_1990s(0, body_of(35), "Time Machine").encode())  # a 1990s header
    put(43, no_space(0, body_of(43).upper(), "JEKYLL").encode())  # an all-capitals transcription
    chapters = body_of(98).split("\n\n")
    half = len(chapters) // 2
    put(98, modern(0, "\n\n".join(chapters[:half]), "A Tale, Volume I").encode())  # the novel in two volumes
    put(98, modern(0, "\n\n".join(chapters[half:]), "A Tale, Volume II").encode())
    return planted
