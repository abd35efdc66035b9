"""What a checkpoint holds, and writing/reading it with torch.distributed.checkpoint (DCP).

DCP writes sharded: every rank writes its own `__<rank>_0.distcp` file, and rank 0 (DCP's
coordinator) writes `.metadata`, which maps every key (and every shard of it) to where it
lies. Under fsdp, `get_state_dict` gives each rank's shards of the parameters and AdamW
moments (DTensors) and each rank writes just those rows; replicated values (ddp keeps a full
copy of the model on each rank) are written once, spread over the ranks. Reading lays the
saved rows out for the ranks and layout of the run that reads (`set_state_dict`): a
checkpoint written by N fsdp ranks loads on M ranks, under ddp, or into one whole model for
export. Files go through fsspec (`FsspecWriter`/`FsspecReader`), so a run directory may be a
local folder or an object-store URL such as s3://bucket/run.

Keys of the DCP state dict:

    model     parameters and buffers by name (`get_state_dict`: no DDP or torch.compile prefixes)
    optim     optimizer state keyed by parameter name, and the param groups (with their lr);
              keyed by name, not position, so it loads under any world size
    train     a blob, the same on every rank: step, tokens seen, the world size, the dataset
              fingerprint and the W&B run id. The learning-rate schedule is a pure function of
              the step (gptrain.config.lr_at), so the step is the scheduler's whole state.
    rank<r>   a blob per rank: its loader state and its RNG states (torch CPU and CUDA, numpy,
              python), which drive dropout and anything else random on that rank

Per-rank state goes into DCP under per-rank keys rather than into side files: one write
path for synchronous and asynchronous saves alike, and the shard files (covered by the
commit marker's size check) hold it. The keys are distinct per rank, so DCP's deduplication
of replicated items, which would keep only one rank's copy, leaves them alone.

A blob is a `torch.save` byte stream read back with `weights_only=True`: tensors and plain
containers only, so reading a checkpoint never runs pickled code. The resolved run config
is not a blob but a readable config.yaml next to the shards, with the tokenizer spec
(gptrain_tokenizer.json); rank 0 writes both.
"""

from __future__ import annotations

import io
import random
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import yaml
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from gptrain import storage
from gptrain.checkpoint.checksums import ChecksummingWriter
from gptrain.checkpoint.commit import CheckpointError
from gptrain.config import RunConfig
from gptrain.errors import GptrainError
from gptrain.tokenizer import TOKENIZER_SPEC_FILE

if TYPE_CHECKING:
    from torch import nn

CONFIG_FILE = "config.yaml"

# DCP warns on every single-process save/load, even when asked for one with no_dist=True.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class Checkpointable(Protocol):
    """The trainer state a checkpoint saves and restores (gptrain.train.trainer.TrainState)."""

    model: nn.Module  # the model DDP and torch.compile wrap (FSDP shards it in place)
    optimizer: torch.optim.Optimizer
    loader: Any  # state_dict() / load_state_dict(): the data position
    step: int
    tokens_seen: int


@dataclass
class TrainProgress:
    """The `train` blob: where the run stands. DCP writes one copy of a key that every rank
    saves, taken from any of them, so its fields must be the same on every rank."""

    step: int
    tokens_seen: int
    world_size: int
    dataset_fingerprint: str
    wandb_run_id: str | None = None


# ---------------------------------------------------------------------------------------------
# RNG states.


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's RNG states, in a form `weights_only` loading accepts (no numpy arrays)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------------------------
# Blobs.


def _to_blob(value: dict[str, Any]) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return buffer


def _from_blob(buffer: io.BytesIO, what: str) -> dict[str, Any]:
    buffer.seek(0)
    try:
        return torch.load(buffer, weights_only=True)
    except Exception as err:  # any unpickling failure means damaged bytes
        raise CheckpointError(f"{what}: cannot be decoded ({err})") from err


# ---------------------------------------------------------------------------------------------
# Writing.


def state_to_save(
    state: Checkpointable, progress: TrainProgress, rank: int, device: torch.device
) -> dict[str, Any]:
    """The DCP state dict for this rank. Tensors are the live ones: a synchronous save writes
    them before training goes on; an asynchronous one copies them to CPU first (staging)."""
    model_state, optim_state = get_state_dict(state.model, state.optimizer)
    return {
        "model": model_state,
        "optim": optim_state,
        "train": _to_blob(vars(progress)),
        f"rank{rank}": _to_blob({"loader": state.loader.state_dict(), "rng": capture_rng(device)}),
    }


def write_run_files(url: str, config_yaml: str, tokenizer_spec: dict[str, Any]) -> None:
    """Rank 0's readable files: the resolved config, and the tokenizer spec (which lets
    `gptrain generate` and exports find the tokenizer the run trained with)."""
    storage.write_bytes_atomic(storage.join(url, CONFIG_FILE), config_yaml.encode())
    storage.write_json_atomic(storage.join(url, TOKENIZER_SPEC_FILE), tokenizer_spec)


def read_run_config(url: str) -> RunConfig:
    """The resolved config saved in checkpoint folder `url`; an error naming the file if it is
    missing or not a valid run config."""
    config_url = storage.join(url, CONFIG_FILE)
    try:
        return RunConfig.from_dict(yaml.safe_load(storage.read_bytes(config_url)))
    except FileNotFoundError as err:
        raise CheckpointError(f"{config_url} is missing") from err
    except (GptrainError, yaml.YAMLError) as err:
        raise CheckpointError(f"{config_url} is not a valid run config: {err}") from err


def write_shards(writer: ChecksummingWriter, state_dict: dict[str, Any], process_group) -> None:
    """Every rank writes its shard; returns when this rank's files and (on rank 0) the
    metadata are written, their sha256s in `writer.records`."""
    # Plan caching: every save of a run has the same keys and shapes, so after the first one
    # the ranks send no plans to the coordinator (DCP compares each rank's plan with the last
    # and sends only changes) and the coordinator does not plan again.
    planner = DefaultSavePlanner(enable_plan_caching=True)
    dcp.save(state_dict, storage_writer=writer, planner=planner, process_group=process_group,
             no_dist=process_group is None)


class ReusedCpuStaging:
    """Copies of the state in CPU memory, reused by every async save (pinned when CUDA is there,
    for fast copies from the GPU). Fresh buffers at each save would cost a page fault per page on
    first touch, as much again as the copy itself; the price is one resident copy of the state in
    host RAM. A buffer is overwritten only by the next save, which starts after the previous one
    has committed (the Checkpointer keeps at most one in flight), so no write reads a buffer
    while it changes. No shared memory: the write runs in a thread of this process."""

    def __init__(self) -> None:
        self._buffers: dict[str, Any] | None = None

    def copy(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """`state_dict` with its tensors copied into the buffers (other values, the blobs, as they are)."""
        if self._buffers is None:
            self._buffers = _create_cpu_state_dict(state_dict, pin_memory=torch.cuda.is_available())
        return _copy_state_dict(state_dict, self._buffers)


# ---------------------------------------------------------------------------------------------
# Reading.


def _load(url: str, state_dict: dict[str, Any], process_group) -> None:
    try:
        dcp.load(
            state_dict,
            storage_reader=FsspecReader(url),
            # Only the keys asked for: a rank of a smaller world reads no other rank's blob.
            planner=DefaultLoadPlanner(allow_partial_load=True),
            process_group=process_group,
            no_dist=process_group is None,
        )
    except Exception as err:  # DCP raises many kinds (CheckpointException, RuntimeError, EOFError)
        # A storage fault is no sign of damage: falling back to an older checkpoint would hide it.
        fault = storage.storage_fault(err, url)
        raise fault or CheckpointError(f"{url}: reading the checkpoint failed: {err}") from err


def _progress(buffer: io.BytesIO, url: str) -> TrainProgress:
    blob = _from_blob(buffer, f"{url}: train state")
    try:
        return TrainProgress(**blob)
    except TypeError as err:
        raise CheckpointError(f"{url}: train state has unexpected fields ({err})") from err


def read_into(
    url: str,
    state: Checkpointable,
    *,
    rank: int,
    saved_world_size: int,
    dataset_fingerprint: str,
    device: torch.device,
    process_group,
) -> TrainProgress:
    """Load model, optimizer, progress and this rank's loader/RNG state into `state`.

    A rank that did not exist when the checkpoint was saved (the world grew) takes rank 0's
    loader state (the data position is global, the same on every rank) and keeps its freshly
    seeded RNG.
    """
    model_state, optim_state = get_state_dict(state.model, state.optimizer)
    source_rank = rank if rank < saved_world_size else 0
    wanted: dict[str, Any] = {
        "model": model_state, "optim": optim_state, "train": io.BytesIO(), f"rank{source_rank}": io.BytesIO(),
    }
    _load(url, wanted, process_group)
    progress = _progress(wanted["train"], url)
    if progress.dataset_fingerprint != dataset_fingerprint:
        raise CheckpointError(
            f"{url}: saved while training on dataset {progress.dataset_fingerprint[:12]}, but data.path now "
            f"holds dataset {dataset_fingerprint[:12]}: resume with the same prepared data"
        )
    rank_state = _from_blob(wanted[f"rank{source_rank}"], f"{url}: rank {source_rank} state")
    set_state_dict(state.model, state.optimizer, model_state_dict=wanted["model"], optim_state_dict=wanted["optim"])
    state.loader.load_state_dict(rank_state["loader"])
    state.step, state.tokens_seen = progress.step, progress.tokens_seen
    if source_rank == rank:
        # Last: nothing after this may draw random numbers before training goes on.
        restore_rng(rank_state["rng"], device)
    return progress


def read_model_weights(url: str, model: nn.Module) -> None:
    """Only the `model` key, into `model` (export and inference: no optimizer needed)."""
    wanted = {"model": get_model_state_dict(model)}
    _load(url, wanted, None)
    set_model_state_dict(model, wanted["model"])
