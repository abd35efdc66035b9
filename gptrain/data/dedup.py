"""Near-duplicate editions: a MinHash per book in each array task, resolved once at finalize.

Project Gutenberg holds several editions of many works: re-releases, older all-caps or 8-bit
transcriptions, a novel whole and in volumes. Each kept book gets a MinHash (datasketch) of
(a consistent eighth of) its 5-word shingles, over its words casefolded and without
punctuation or layout, so re-wrapped, re-encoded, re-headed and all-caps editions have the
same shingles. Finalize
indexes every book in a MinHash LSH Ensemble (datasketch), which finds containment, so a
volume is found inside the whole work as well as an edition inside another, checks each
candidate pair's estimated containment against the threshold, and keeps one book of each
group by a fixed rule (`resolve`): the dropped books then contribute no token to either
split, so no work sits on both sides of the train/val split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from gptrain.errors import GptrainError

SHINGLE_WORDS = 5
SAMPLED_HASHES = 1 << 29  # shingle hashes below this go into the MinHash: an eighth of them
MINHASH_SEED = 1
CONFIDENCE_Z = 1.0  # standard errors by which a pair's estimated containment must clear the threshold
ENCODINGS = ("utf-8", "ascii", "latin-1")  # best first: the richest text of the same work

# Curly quotes, dashes, ellipses, guillemets, no-break spaces: separators, as their ASCII forms
# are in other editions (Latin-1 files have neither curly quotes nor dashes).
# Matched on the UTF-8 bytes: the pattern starts with two lead bytes, so the engine skips ahead.
_NON_ASCII_PUNCTUATION = re.compile(b"|".join(re.escape(mark.encode()) for mark in "’‘“”„—–―…«»‹›\u00a0\u2009\u200a"))
# Bytes that belong to words: ASCII letters and digits, and every byte of a multi-byte UTF-8
# character left (accented letters, other scripts).
_WORD_BYTE = np.zeros(256, dtype=bool)
_WORD_BYTE[[*range(ord("0"), ord("9") + 1), *range(ord("a"), ord("z") + 1), *range(128, 256)]] = True
# An odd multiplier for the polynomial shingle hash, and its inverse modulo 2**64.
_BASE = 0x9E3779B97F4A7C15
_BASE_INVERSE = pow(_BASE, -1, 1 << 64)


@dataclass(frozen=True)
class DedupOptions:
    enabled: bool = True
    threshold: float = 0.8  # estimated share of a book's shingles found in another book
    num_perm: int = 128  # MinHash permutations

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise GptrainError(f"dedup threshold must be within (0, 1], got {self.threshold}")
        if not 16 <= self.num_perm <= 1024:
            raise GptrainError(f"dedup num_perm must be within [16, 1024], got {self.num_perm}")


@dataclass(frozen=True)
class BookSketch:
    """What finalize needs of a kept book to find and resolve its duplicates."""

    book_id: int
    shingles: int  # distinct sampled shingles: the set size the containment estimates use
    encoding: str  # of the raw file: one of ENCODINGS
    all_caps: bool  # an all-capitals transcription
    signature: np.ndarray  # uint32[num_perm]

    def record(self) -> list:
        return [self.book_id, self.shingles, self.encoding, self.all_caps]

    def rank(self) -> tuple:
        """Lower is the better edition of the same work: mixed case, then the richer encoding."""
        return (self.all_caps, ENCODINGS.index(self.encoding))


def shingle_hashes(text: str) -> np.ndarray:
    """The distinct 32-bit hashes of the text's 5-word shingles: words casefolded, without
    punctuation or spacing (a word is a run of ASCII letters and digits and non-ASCII letters).
    Vectorised: a polynomial hash over the words joined by single separators, from prefix
    sums, so no Python loop runs per word."""
    data = np.frombuffer(_NON_ASCII_PUNCTUATION.sub(b" ", text.casefold().encode()), dtype=np.uint8)
    in_word = _WORD_BYTE[data]
    # Keep the words and one separator after each: the words joined by single zero bytes.
    keep = in_word | np.concatenate(([False], in_word[:-1]))
    stream = np.where(in_word[keep], data[keep], 0).astype(np.uint64)
    edges = np.diff(np.concatenate(([0], in_word[keep].view(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    if len(starts) == 0:
        return np.zeros(0, dtype=np.uint32)
    span = min(SHINGLE_WORDS, len(starts))
    first, last = starts[: len(starts) - span + 1], ends[span - 1 :]
    with np.errstate(over="ignore"):
        powers = np.cumprod(np.full(len(stream), _BASE, dtype=np.uint64)) * np.uint64(_BASE_INVERSE)
        prefix = np.concatenate((np.zeros(1, np.uint64), np.cumsum((stream + np.uint64(1)) * powers, dtype=np.uint64)))
        inverse = np.cumprod(np.full(len(stream), _BASE_INVERSE, dtype=np.uint64)) * np.uint64(_BASE)
        # sum over the shingle's bytes of byte * BASE**(offset from its first byte)
        values = (prefix[last] - prefix[first]) * inverse[first]
    hashes = np.sort((values ^ (values >> np.uint64(32))).astype(np.uint32))
    # Distinct values of the sorted array (np.unique is many times slower on numpy 2.4).
    return hashes[np.concatenate(([True], hashes[1:] != hashes[:-1]))]


def sketch_book(book_id: int, raw: bytes, text: str, num_perm: int) -> BookSketch:
    """The book's MinHash (datasketch) and the facts `resolve` ranks editions by."""
    from datasketch import MinHash

    hashes = shingle_hashes(text)
    # Consistent sampling: the same eighth of all possible shingles in every book, so the
    # estimates stay unbiased, for an eighth of the MinHash work.
    sampled = hashes[hashes < SAMPLED_HASHES].tolist()
    minhash = MinHash(num_perm=num_perm, seed=MINHASH_SEED, hashfunc=int)
    for start in range(0, len(sampled), 8192):  # bounded memory: num_perm x 8192 at a time
        minhash.update_batch(sampled[start : start + 8192])
    return BookSketch(book_id, len(sampled), _encoding(raw), _all_caps(text), minhash.hashvalues.astype(np.uint32))


def _all_caps(text: str) -> bool:
    """More than 90% of the letters (in the first 200,000 characters) are capitals."""
    sample = text[:200_000]
    codes = [np.frombuffer(t.encode("utf-32-le"), dtype=np.uint32) for t in (sample, sample.lower(), sample.upper())]
    if len(codes[1]) != len(codes[0]) or len(codes[2]) != len(codes[0]):
        return False  # a case mapping changed the length (rare letters): not an all-caps English text
    upper, lower = int((codes[0] != codes[1]).sum()), int((codes[0] != codes[2]).sum())
    return upper > 9 * lower and upper > 0


def _encoding(raw: bytes) -> str:
    if raw.isascii():
        return "ascii"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return "latin-1"
    return "utf-8"


@dataclass(frozen=True)
class Duplicate:
    book_id: int  # the dropped book
    duplicate_of: int  # the kept book it duplicates
    similarity: float  # estimated Jaccard similarity of their shingles
    containment: float  # estimated share of the smaller one's shingles in the other
    # "edition": each holds the other; "part": it is part of the kept book; "whole": it holds
    # the kept book (a part kept before it: only where parts nest, e.g. a chapter in a volume)
    relation: str

    def reason(self) -> str:
        what = {"edition": "an edition of", "part": "a part of", "whole": "holds"}[self.relation]
        return (f"duplicate: {what} book {self.duplicate_of} "
                f"(similarity {self.similarity:.2f}, containment {self.containment:.2f})")


def resolve(sketches: list[BookSketch], options: DedupOptions) -> list[Duplicate]:
    """The books to drop, each with the kept book it duplicates; the same answer for the same
    sketches, whatever their order.

    Pairs come from a MinHash LSH Ensemble (containment at `threshold`) and are kept when the
    estimated containment of one in the other reaches it with a standard error to spare (a
    small book's containment in a much larger one is too uncertain with 128 permutations:
    such pairs are kept apart rather than a distinct book dropped). Each book is then visited in a
    fixed order, and kept unless it is paired with a book kept before it: first the books
    that are not part of a larger one (the best edition first: mixed case, then UTF-8, ASCII,
    Latin-1, then the lowest id), then the parts, largest first. So of two editions the best
    stays, and of a work whole and in volumes the whole stays.
    """
    from datasketch import MinHash, MinHashLSHEnsemble

    sketches = sorted((s for s in sketches if s.shingles > 0), key=lambda s: s.book_id)
    if len(sketches) < 2:
        return []
    minhashes = {
        s.book_id: MinHash(num_perm=options.num_perm, seed=MINHASH_SEED, hashvalues=s.signature, scheme="affine32")
        for s in sketches
    }
    by_id = {s.book_id: s for s in sketches}
    # The ensemble's query may miss a pair its estimate then accepts; the threshold just below
    # the decision keeps such misses rare, and the estimate decides.
    index = MinHashLSHEnsemble(threshold=max(0.05, options.threshold - 0.1), num_perm=options.num_perm, num_part=8)
    index.index([(s.book_id, minhashes[s.book_id], _size_class(s.shingles)) for s in sketches])
    containment: dict[tuple[int, int], tuple[float, float]] = {}  # (part, whole) -> (jaccard, containment)
    for s in sketches:
        for other in index.query(minhashes[s.book_id], _size_class(s.shingles)):
            if other == s.book_id:
                continue
            jaccard = float(minhashes[s.book_id].jaccard(minhashes[other]))
            # The estimate must clear the threshold by a standard error: for a small book
            # against a large one the containment scales a tiny, noisy Jaccard estimate up.
            low = jaccard - CONFIDENCE_Z * (jaccard * (1 - jaccard) / options.num_perm) ** 0.5
            if _containment(low, s.shingles, by_id[other].shingles) >= options.threshold:
                containment[(s.book_id, other)] = (jaccard, _containment(jaccard, s.shingles, by_id[other].shingles))
    pairs: dict[int, set[int]] = {}
    is_part = set()
    for part, whole in containment:
        pairs.setdefault(part, set()).add(whole)
        pairs.setdefault(whole, set()).add(part)
        if (whole, part) not in containment:
            is_part.add(part)
    order = sorted(
        (s for s in sketches if s.book_id in pairs),
        key=lambda s: (s.book_id in is_part, -s.shingles if s.book_id in is_part else 0, s.rank(), s.book_id),
    )
    kept: set[int] = set()
    dropped = []
    for s in order:
        partners = sorted(pairs[s.book_id] & kept)
        if not partners:
            kept.add(s.book_id)
            continue
        best = max(partners, key=lambda k: (_pair(containment, s.book_id, k)[0], -k))
        jaccard, share = _pair(containment, s.book_id, best)
        inside, holds = (s.book_id, best) in containment, (best, s.book_id) in containment
        relation = "edition" if inside and holds else "part" if inside else "whole"
        dropped.append(Duplicate(s.book_id, best, round(jaccard, 4), round(share, 4), relation))
    return sorted(dropped, key=lambda d: d.book_id)


def _size_class(size: int) -> int:
    """`size` to two significant digits: the ensemble's partitioning takes time quadratic in the
    number of distinct sizes (minutes for 10,000 books with sizes of their own), and only needs
    them roughly; the decision uses the exact sizes."""
    scale = 10 ** max(0, len(str(size)) - 2)
    return max(1, round(size / scale) * scale)


def _containment(jaccard: float, size: int, other_size: int) -> float:
    """|A ∩ B| / |A| from the Jaccard similarity J = |A ∩ B| / |A ∪ B| and the set sizes."""
    return min(1.0, jaccard * (size + other_size) / ((1.0 + jaccard) * size))


def _pair(containment: dict, book: int, other: int) -> tuple[float, float]:
    """(Jaccard, containment) of a paired book: its own containment in `other` when found,
    else the other's in it (a part kept before a larger book that holds it)."""
    return containment.get((book, other)) or containment[(other, book)]


def signatures_bytes(sketches: list[BookSketch], num_perm: int) -> bytes:
    """The task's signatures as one .npy array, uint32[books, num_perm], in the marker's order."""
    import io

    matrix = np.stack([s.signature for s in sketches]) if sketches else np.zeros((0, num_perm), np.uint32)
    buffer = io.BytesIO()
    np.save(buffer, matrix.astype("<u4"), allow_pickle=False)
    return buffer.getvalue()


def load_sketches(records: list[list], data: bytes, source: str) -> list[BookSketch]:
    """BookSketches from a task marker's records and its signatures file's bytes."""
    import io

    try:
        matrix = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        raise GptrainError(f"{source}: unreadable MinHash signatures ({err})") from err
    if len(matrix) != len(records):
        raise GptrainError(f"{source}: {len(matrix)} signatures for {len(records)} books")
    return [
        BookSketch(int(book_id), int(shingles), encoding, bool(all_caps), row)
        for (book_id, shingles, encoding, all_caps), row in zip(records, matrix)
    ]


def options_record(options: DedupOptions) -> dict[str, Any]:
    """What the manifest records of the dedup settings (all of what decides the outcome)."""
    record = {"enabled": options.enabled}
    if options.enabled:
        record |= {"threshold": options.threshold, "num_perm": options.num_perm, "shingle_words": SHINGLE_WORDS,
                   "seed": MINHASH_SEED, "method": "datasketch MinHash (affine32) + MinHashLSHEnsemble"}
    return record
