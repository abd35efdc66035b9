"""Pretrained weights in (`load_pretrained`) and out in the Hugging Face layout (`save_hf_pretrained`).

Loading builds the model on the meta device (no memory), then fills it one tensor at a
time: the checkpoint tensors of a destination are read, transposed/permuted, copied into a
freshly allocated tensor (cast and moved once) and dropped, and `load_state_dict(assign=True)`
adopts the results without another copy. Peak memory stays near one copy of the weights.

Why each safetensors tensor gets its own short-lived mapping: pages of a memory-mapped file
count in the resident set once read, so copying out of one mapping kept open for the whole
load holds both copies at the end. A mapping per tensor is unmapped as soon as its tensor
is copied. A .pth is read without mmap for the same reason: `torch.load` then allocates
each tensor separately, and popping a tensor once copied frees it. OpenAI's TensorFlow
checkpoint is read by TensorFlow's own reader (the optional `tf` extra), one variable per
call into a fresh array that is dropped once copied.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import math
import os
import posixpath
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from gptrain import storage
from gptrain.errors import GptrainError
from gptrain.models.layouts import (
    BOOK_MARKER,
    META_SHARD_DIMS,
    Layout,
    Part,
    Plan,
    book_config,
    book_layout,
    book_n_heads,
    hf_gpt2_config,
    hf_gpt2_config_dict,
    hf_gpt2_layout,
    hf_llama_config,
    hf_llama_config_dict,
    hf_llama_layout,
    meta_config,
    meta_layout,
    openai_gpt2_config,
    openai_gpt2_layout,
)
from gptrain.models.transformer import Transformer

OPENAI_HPARAMS_FILE = "hparams.json"
LAYOUTS_LOOKED_FOR = (
    "config.json (model_type gpt2 or llama) with model.safetensors or model.safetensors.index.json",
    "hparams.json with a TensorFlow model.ckpt (OpenAI's GPT-2 release)",
    "params.json with consolidated.NN.pth (Meta's Llama release)",
    "one .pth/.pt state dict of the reference book's GPTModel",
)


@dataclass
class Checkpoint:
    """The tensors of a checkpoint by name; `take` reads one, once."""

    description: str  # the file (or index) named in messages
    shapes: dict[str, tuple[int, ...]]
    files: dict[str, str]  # tensor name -> the file holding it
    take: Callable[[str], torch.Tensor]


def load_pretrained(
    path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, preset: str | None = None,
) -> Transformer:
    """A `Transformer` in eval mode with the weights at `path` (a folder or file, local or URL).

    The layout is detected (see LAYOUTS_LOOKED_FOR). `dtype` None keeps the stored dtype.
    `preset` names the GPT-2 preset whose head count a reference-book .pth (which stores
    no config) should use when its depth and width match no preset.
    """
    from gptrain.checkpoint.export import is_gptrain_checkpoint, load_model_from_checkpoint

    if is_gptrain_checkpoint(path):  # a gptrain run directory (its newest checkpoint) or checkpoint folder
        return load_model_from_checkpoint(path, device, dtype)
    with _local_copy(path) as local:
        layout, checkpoint = _open(local, preset)
        _check(layout, checkpoint)
        with torch.device("meta"):
            model = Transformer(layout.config)
        shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
        state = {name: _build(parts, checkpoint, shapes[name], device, dtype) for name, parts in layout.plan.items()}
    if layout.config.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, assign=True)
    if layout.config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight  # assign=True made two Parameters of one tensor
    for name, buffer in list(model.named_buffers()):  # the non-persistent RoPE tables
        if buffer.is_meta:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, torch.empty_like(buffer, device=device))
    model.init_buffers()
    return model.eval()


def save_hf_pretrained(model: Transformer, out_dir: str, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json and model.safetensors (or shards and an index) in the Hugging Face
    layout of the model's family, loadable by `AutoModelForCausalLM.from_pretrained`."""
    config = model.config
    if config.family == "gpt2":
        layout, hf_config = hf_gpt2_layout(config), hf_gpt2_config_dict(config)
    else:
        layout, hf_config = hf_llama_layout(config), hf_llama_config_dict(config)
    config_file = storage.join(out_dir, "config.json")
    if storage.exists(config_file):
        raise GptrainError(f"{config_file} already exists; refusing to overwrite a saved model")
    state = model.state_dict()
    hf_config["torch_dtype"] = str(state["tok_emb.weight"].dtype).removeprefix("torch.")

    shards = _shard(layout.plan, state, max_shard_bytes)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    weight_map, total_bytes = {}, 0
    for file, shard in zip(names, shards):
        tensors = [(part.name, state[dest], functools.partial(_split_out, state[dest], row, part, copy=False),
                    part.shape) for dest, row, part in shard]
        storage.write_file_atomic(storage.join(out_dir, file), functools.partial(_write_safetensors, tensors))
        weight_map |= dict.fromkeys((name for name, *_ in tensors), file)
        total_bytes += sum(source.element_size() * math.prod(shape) for _, source, _, shape in tensors)
    if len(names) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        storage.write_json_atomic(storage.join(out_dir, "model.safetensors.index.json"), index)
    storage.write_json_atomic(config_file, hf_config)  # last: a folder with a config is complete


def layout_state_dict(model: Transformer, layout: Layout) -> dict[str, torch.Tensor]:
    """The model's tensors under another layout's names (un-fused, un-padded, transposed)."""
    state = model.state_dict()
    return {part.name: _split_out(state[dest], row, part) for dest, row, part in _placed_parts(layout.plan)}


# --- finding and reading checkpoints ------------------------------------------------------


@contextlib.contextmanager
def _local_copy(path: str) -> Iterator[str]:
    """The path itself when local; else a temporary download (mmap and torch.load need files)."""
    fs, inner = storage.filesystem(path)
    if not fs.exists(inner):
        raise GptrainError(f"{path}: no such file or folder")
    if storage.is_local(path):
        yield inner
        return
    with tempfile.TemporaryDirectory(prefix="gptrain-weights-") as tmp:
        local = os.path.join(tmp, posixpath.basename(inner.rstrip("/")) or "weights")
        fs.get(inner, local, recursive=fs.isdir(inner))
        yield local


def _open(path: str, preset: str | None) -> tuple[Layout, Checkpoint]:
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    meta_shards = glob.glob(os.path.join(folder, "consolidated.*.pth"))
    is_meta = bool(meta_shards) and os.path.exists(os.path.join(folder, "params.json"))
    is_openai = os.path.exists(os.path.join(folder, OPENAI_HPARAMS_FILE)) and bool(_tf_checkpoint_indexes(folder))
    if is_openai and (os.path.isdir(path) or ".ckpt" in os.path.basename(path)):
        return _open_openai(folder)
    if os.path.isdir(path):
        if is_meta:
            return _open_meta(folder, meta_shards)
        config_file = os.path.join(folder, "config.json")
        hf_config = _read_json(config_file) if os.path.exists(config_file) else {}
        if "model_type" in hf_config:
            return _open_hf(folder, hf_config)
        state_dicts = glob.glob(os.path.join(folder, "*.pth")) + glob.glob(os.path.join(folder, "*.pt"))
        if len(state_dicts) == 1:
            return _open_book(state_dicts[0], preset)
    elif path.endswith(".safetensors"):
        return _open(folder, preset)
    elif path.endswith((".pth", ".pt")):
        if is_meta and os.path.basename(path).startswith("consolidated."):
            return _open_meta(folder, meta_shards)
        return _open_book(path, preset)
    raise GptrainError(f"{path}: unknown weights layout; looked for " + "; or ".join(LAYOUTS_LOOKED_FOR))


def _open_hf(folder: str, hf_config: dict) -> tuple[Layout, Checkpoint]:
    config_file = os.path.join(folder, "config.json")
    model_type = hf_config["model_type"]
    if model_type not in ("gpt2", "llama"):
        raise GptrainError(f"{config_file}: model_type {model_type!r} is not supported (supported: gpt2, llama)")
    single, index = os.path.join(folder, "model.safetensors"), os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(single):
        checkpoint = _safetensors_checkpoint([single], single)
    elif os.path.exists(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise GptrainError(f"{index}: missing key 'weight_map'")
        checkpoint = _safetensors_checkpoint([os.path.join(folder, f) for f in sorted(set(weight_map.values()))], index)
    else:
        raise GptrainError(f"{folder}: has config.json but neither model.safetensors nor model.safetensors.index.json")
    if model_type == "gpt2":
        config = hf_gpt2_config(hf_config, config_file)
        # GPT2LMHeadModel saves "transformer.h.0...", the bare GPT2Model "h.0...".
        prefixed = any(name.startswith("transformer.") for name in checkpoint.shapes)
        return hf_gpt2_layout(config, "transformer." if prefixed else ""), checkpoint
    return hf_llama_layout(hf_llama_config(hf_config, config_file)), checkpoint


def _open_meta(folder: str, shard_files: list[str]) -> tuple[Layout, Checkpoint]:
    params_file = os.path.join(folder, "params.json")
    checkpoint = _meta_checkpoint(sorted(shard_files))
    config = meta_config(_read_json(params_file), checkpoint.shapes.get("tok_embeddings.weight"), params_file)
    return meta_layout(config), checkpoint


def _open_openai(folder: str) -> tuple[Layout, Checkpoint]:
    hparams_file = os.path.join(folder, OPENAI_HPARAMS_FILE)
    config = openai_gpt2_config(_read_json(hparams_file), hparams_file)
    return openai_gpt2_layout(config), _tf_checkpoint(folder)


def _open_book(file: str, preset: str | None) -> tuple[Layout, Checkpoint]:
    state = _read_state_dict(file)
    if BOOK_MARKER not in state:
        if "tok_embeddings.weight" in state:
            raise GptrainError(f"{file}: looks like Meta's Llama layout, but there is no params.json beside it")
        raise GptrainError(
            f"{file}: unknown weights layout (no {BOOK_MARKER!r}; first keys: {_names(list(state))}); "
            "looked for " + "; or ".join(LAYOUTS_LOOKED_FOR)
        )
    checkpoint = Checkpoint(file, {n: tuple(t.shape) for n, t in state.items()}, dict.fromkeys(state, file), state.pop)
    hint_file = os.path.join(os.path.dirname(file), "config.json")
    hint = _read_json(hint_file) if os.path.exists(hint_file) else None
    config = book_config(checkpoint.shapes, book_n_heads(hint, preset, hint_file), file)
    return book_layout(config), checkpoint


def _safetensors_checkpoint(files: list[str], description: str) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    shapes, where = {}, {}
    for file in files:
        if not os.path.exists(file):
            raise GptrainError(f"{description}: names the shard {file}, which does not exist")
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
                    where[name] = file
        except SafetensorError as err:
            raise GptrainError(f"{file}: not a readable safetensors file ({err})") from err

    def take(name: str) -> torch.Tensor:
        with safe_open(where[name], framework="pt") as f:  # unmapped once the caller drops the tensor
            return f.get_tensor(name)

    return Checkpoint(description, shapes, where, take)


def _tf_checkpoint_indexes(folder: str) -> list[str]:
    return glob.glob(os.path.join(folder, "*.ckpt*.index"))


def _tf_checkpoint(folder: str) -> Checkpoint:
    """A TensorFlow checkpoint read by TensorFlow's own reader, one variable at a time."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter on stderr
    try:
        import tensorflow as tf
    except ImportError as err:
        raise GptrainError(
            f"{folder}: reading a TensorFlow checkpoint needs TensorFlow: pip install 'gptrain[tf]'"
        ) from err
    prefixes = sorted(index.removesuffix(".index") for index in _tf_checkpoint_indexes(folder))
    if len(prefixes) > 1:
        # The `checkpoint` file names the newest; by base name only, since TF may have written
        # an absolute path, which names the folder the checkpoint was saved in, not this one.
        state = tf.train.get_checkpoint_state(folder)
        newest = os.path.join(folder, os.path.basename(state.model_checkpoint_path)) if state else None
        if newest not in prefixes:
            raise GptrainError(f"{folder}: several TensorFlow checkpoints and no `checkpoint` file naming one of them")
        prefixes = [newest]
    prefix = prefixes[0]
    try:
        reader = tf.train.load_checkpoint(prefix)
        stored = reader.get_variable_to_shape_map()
    except Exception as err:  # TensorFlow raises its own OpError kinds (DataLoss, NotFound, ...)
        raise GptrainError(f"{prefix}: not a readable TensorFlow checkpoint ({err})") from err

    def unbatched(shape: list[int]) -> tuple[int, ...]:
        # OpenAI's conv1d weights carry a leading 1: (1, in, out).
        return tuple(shape[1:]) if len(shape) == 3 and shape[0] == 1 else tuple(shape)

    shapes = {name: unbatched(shape) for name, shape in stored.items()}

    def take(name: str) -> torch.Tensor:
        try:
            array = reader.get_tensor(name)
        except Exception as err:  # a cut-short file: IndexError; a bad checksum: DataLossError
            raise GptrainError(f"{prefix}: variable {name!r} cannot be read ({err})") from err
        return torch.from_numpy(array.reshape(shapes[name]))

    return Checkpoint(prefix, shapes, dict.fromkeys(shapes, prefix), take)


def _meta_checkpoint(files: list[str]) -> Checkpoint:
    """Meta's model-parallel shards, each tensor reassembled from its slices when taken."""
    shards = [_read_state_dict(file) for file in files]
    for file, shard in zip(files[1:], shards[1:]):
        if shard.keys() != shards[0].keys():
            raise GptrainError(f"{file}: holds different tensors than {files[0]}")
    description = files[0] if len(files) == 1 else f"{files[0]} … {os.path.basename(files[-1])}"

    def shard_dim(name: str) -> int | None:
        components = name.split(".")
        return META_SHARD_DIMS.get(components[-2]) if len(components) > 1 else None

    shapes = {}
    for name, first in shards[0].items():
        dim, shape = shard_dim(name), list(first.shape)
        if dim is not None and len(shards) > 1:
            slices = [list(shard[name].shape) for shard in shards]
            if dim >= len(shape) or any(s[:dim] + s[dim + 1:] != shape[:dim] + shape[dim + 1:] for s in slices):
                raise GptrainError(f"{description}: the slices of tensor {name!r} do not fit together: {slices}")
            shape[dim] = sum(s[dim] for s in slices)
        shapes[name] = tuple(shape)

    def take(name: str) -> torch.Tensor:
        slices = [shard.pop(name) for shard in shards]
        dim = shard_dim(name)
        return slices[0] if dim is None or len(slices) == 1 else torch.cat(slices, dim=dim)

    return Checkpoint(description, shapes, dict.fromkeys(shapes, description), take)


def _read_state_dict(file: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many kinds (pickle, zip, unsupported globals)
        raise GptrainError(f"{file}: not a loadable PyTorch state dict ({err})") from err
    if isinstance(state, dict) and "model_state_dict" in state:  # the book's model-and-optimizer file
        state = state["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise GptrainError(f"{file}: expected a state dict mapping names to tensors")
    return state


def _read_json(file: str) -> dict:
    try:
        return storage.read_json(file)
    except ValueError as err:
        raise GptrainError(str(err)) from err


# --- checking and building ----------------------------------------------------------------


def _check(layout: Layout, checkpoint: Checkpoint) -> None:
    """Every tensor the layout needs is present with the shape its config implies, and
    nothing else is there (an extra tensor means the config does not describe the weights)."""
    expected = {part.name: part for parts in layout.plan.values() for part in parts}
    missing = [name for name in expected if name not in checkpoint.shapes]
    if missing:
        raise GptrainError(f"{checkpoint.description}: missing tensor(s) {_names(missing)} ({layout.name} layout)")
    for name, part in expected.items():
        if checkpoint.shapes[name] != part.shape:
            raise GptrainError(
                f"{checkpoint.files[name]}: tensor {name!r} has shape {list(checkpoint.shapes[name])}, "
                f"expected {list(part.shape)} from the model config"
            )
    extra = [name for name in checkpoint.shapes if name not in expected and not layout.is_ignored(name)]
    if extra:
        raise GptrainError(
            f"{checkpoint.description}: unexpected tensor(s) {_names(extra)} for a {layout.name} model "
            f"with {layout.config.n_layers} layers"
        )


def _build(parts: tuple[Part, ...], checkpoint: Checkpoint, shape, device, dtype) -> torch.Tensor:
    """One destination tensor: its parts stacked along rows, padding rows zeroed."""
    dest, row = None, 0
    for part in parts:
        source = checkpoint.take(part.name)
        if part.transposed:
            source = source.t()
        elif part.rope_heads:
            # Meta rotates interleaved pairs (2j, 2j+1) of each head; we rotate (j, j + head_dim/2).
            # Reordering each head's q/k rows to [evens; odds] maps one convention onto the other,
            # and q·k is unchanged because q and k are reordered alike.
            source = source.unflatten(0, (part.rope_heads, -1, 2)).transpose(1, 2).flatten(0, 2)
        if dest is None:
            dest = torch.empty(shape, dtype=dtype or source.dtype, device=device)
        dest[row:row + part.rows].copy_(source)
        row += part.rows
        del source  # frees (or unmaps) the checkpoint's copy before the next part is read
    dest[row:].zero_()  # vocabulary padding: forward never returns these rows' logits
    return dest


# --- export -------------------------------------------------------------------------------


def _placed_parts(plan: Plan) -> Iterator[tuple[str, int, Part]]:
    """(our tensor, first row, part) for every part of the plan."""
    for dest, parts in plan.items():
        row = 0
        for part in parts:
            yield dest, row, part
            row += part.rows


def _split_out(tensor: torch.Tensor, row: int, part: Part, copy: bool = True) -> torch.Tensor:
    if part.rope_heads:
        raise GptrainError("writing Meta's interleaved-RoPE layout is not supported; export the HF layout")
    piece = tensor[row:row + part.rows]
    # A contiguous CPU copy of its own (safetensors' writers refuse tensors that share memory);
    # `copy=False` (gptrain's own writer): a copy only where the piece is not contiguous on the CPU.
    piece = (piece.t() if part.transposed else piece).to("cpu")
    return piece.clone(memory_format=torch.contiguous_format) if copy else piece.contiguous()


def _shard(plan: Plan, state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[tuple[str, int, Part]]]:
    shards: list[list[tuple[str, int, Part]]] = [[]]
    size = 0
    for dest, row, part in _placed_parts(plan):
        nbytes = state[dest].element_size() * torch.Size(part.shape).numel()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((dest, row, part))
        size += nbytes
    return shards


# safetensors' dtype names for the dtypes gptrain models are stored in.
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


def _write_safetensors(tensors: list[tuple[str, torch.Tensor, Callable[[], torch.Tensor], tuple]], f) -> None:
    """Write a .safetensors file: an 8-byte little-endian header length, the JSON header
    (dtype, shape and byte range of each tensor, padded with spaces to 8 bytes), then the
    tensors' bytes. Each tensor is produced (`make()`), written and dropped in turn, so the
    file costs memory for one tensor, not for all of them as the safetensors package's
    writers do (they take every tensor at once).

    `tensors`: (name, the source tensor (for its dtype), make, shape) in file order."""
    header: dict = {"__metadata__": {"format": "pt"}}  # transformers expects the "pt" format tag
    offset = 0
    for name, source, _, shape in tensors:
        size = source.element_size() * math.prod(shape)
        header[name] = {"dtype": _SAFETENSORS_DTYPES[source.dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    f.write(len(text).to_bytes(8, "little") + text)
    for _, _, make, _ in tensors:
        f.write(make().view(torch.uint8).numpy().data)  # the (contiguous) tensor's own memory, not a copy


def _names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
