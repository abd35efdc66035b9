"""The run configuration: one typed, validated dataclass per section, composed into `RunConfig`.

A run is described by a YAML file (a shipped preset from gptrain/presets/, or any file or URL)
plus dotted command-line overrides such as `optim.lr=3e-4 train.max_steps=200`. Values are
checked against the field types once, when the config is built, so a typo fails before any
GPU time is spent and the message names the key at fault. The resolved config round-trips
through `to_dict()`/`from_dict()` exactly: it is saved as config.yaml in the run directory
and stored in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml

from gptrain import storage
from gptrain.errors import GptrainError
from gptrain.models.config import MODEL_CONFIGS, ModelConfig, get_model_config


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise GptrainError(f"{key}={value!r}: {rule}")


def _positive(key: str, value: float) -> None:
    _require(value > 0 and math.isfinite(value), key, value, "must be > 0")


def _non_negative(key: str, value: float, meaning: str = "") -> None:
    _require(value >= 0 and math.isfinite(value), key, value, f"must be >= 0{meaning}")


@dataclass(frozen=True)
class ModelSection:
    """A model preset from gptrain.models.config; each override left at None keeps the preset's value."""

    name: str = "gpt2-124m"
    context_length: int | None = None
    vocab_size: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    d_model: int | None = None
    d_ff: int | None = None  # not derived from d_model: set both when resizing
    dropout: float | None = None
    tie_embeddings: bool | None = None
    # Implementation switches (gptrain.models.config.ModelConfig): same function, other speed.
    attention: Literal["sdpa", "masked"] | None = None
    fused_qkv: bool | None = None
    vocab_pad_multiple: int | None = None
    dropout_masks: Literal["hash", "aten"] | None = None

    def __post_init__(self) -> None:
        known = ", ".join(MODEL_CONFIGS)
        _require(self.name in MODEL_CONFIGS, "model.name", self.name, f"unknown model; known: {known}")
        # The preset's context is the longest its architecture was built for (positions learned
        # or RoPE-scaled up to it); past it a run only finds out by running out of memory.
        limit = MODEL_CONFIGS[self.name].context_length
        _require(self.context_length is None or self.context_length <= limit, "model.context_length",
                 self.context_length, f"must be <= {limit}, the longest context of model {self.name!r}")
        self.resolve()  # ModelConfig checks that the overrides fit together (heads divide d_model, ...)

    def resolve(self) -> ModelConfig:
        overrides = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}
        return get_model_config(self.name, **overrides)


@dataclass(frozen=True)
class DataConfig:
    path: str | None = None  # dataset folder or URL written by `gptrain prepare`; required to train

    def __post_init__(self) -> None:
        _require(self.path is None or self.path != "", "data.path", self.path, "must be a folder or URL, or null")


@dataclass(frozen=True)
class GaloreConfig:
    """GaLore (Zhao et al. 2024): AdamW on low-rank projections of the 2-D weight gradients."""

    enabled: bool = False
    rank: int = 128
    update_proj_gap: int = 200  # steps between recomputing the projection (an SVD)
    scale: float = 0.25
    proj_type: Literal["std", "reverse_std", "right", "left", "full"] = "std"

    def __post_init__(self) -> None:
        _require(self.rank >= 1, "optim.galore.rank", self.rank, "must be >= 1")
        _require(self.update_proj_gap >= 1, "optim.galore.update_proj_gap", self.update_proj_gap, "must be >= 1")
        _positive("optim.galore.scale", self.scale)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW. `lr` is the peak learning rate that the schedule warms up to and decays from."""

    lr: float = 5e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global gradient norm; 0 or null turns clipping off
    fused: bool | Literal["auto"] = "auto"  # auto: the fused kernel when training on CUDA or CPU
    galore: GaloreConfig = field(default_factory=GaloreConfig)

    def __post_init__(self) -> None:
        _positive("optim.lr", self.lr)
        _non_negative("optim.weight_decay", self.weight_decay)
        _require(0 <= self.beta1 < 1, "optim.beta1", self.beta1, "must be in [0, 1)")
        _require(0 <= self.beta2 < 1, "optim.beta2", self.beta2, "must be in [0, 1)")
        _positive("optim.eps", self.eps)
        if self.grad_clip is not None:
            _non_negative("optim.grad_clip", self.grad_clip, " (0 or null: off)")


@dataclass(frozen=True)
class ScheduleConfig:
    """Linear warmup from `initial_lr` to the peak `optim.lr`, then cosine decay to `min_lr`
    (the reference book's appendix D), or a constant peak after the warmup."""

    kind: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    initial_lr: float = 0.0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        _non_negative("schedule.warmup_steps", self.warmup_steps)
        _non_negative("schedule.initial_lr", self.initial_lr)
        _non_negative("schedule.min_lr", self.min_lr)


def lr_at(step: int, schedule: ScheduleConfig, peak_lr: float, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of `max_steps` steps."""
    if step < schedule.warmup_steps:
        return schedule.initial_lr + (peak_lr - schedule.initial_lr) * step / schedule.warmup_steps
    if schedule.kind == "constant":
        return peak_lr
    progress = min(1.0, (step - schedule.warmup_steps) / max(1, max_steps - schedule.warmup_steps))
    return schedule.min_lr + (peak_lr - schedule.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class TrainConfig:
    """The length and shape of the run. Exactly one of max_steps / max_tokens sets its length."""

    run_dir: str = "runs/default"  # folder or URL for config.yaml, metrics and checkpoints
    max_steps: int | None = None
    max_tokens: int | None = None  # token budget; steps = ceil(max_tokens / tokens per step)
    micro_batch_size: int = 8  # sequences per forward pass on one rank
    grad_accum_steps: int = 1
    seed: int = 123
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 where the hardware computes bf16 natively (CUDA Ampere+, CPUs with AVX512-BF16
    # or AMX), fp32 elsewhere. Weights and optimizer state stay fp32 either way.
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    # How bf16 computes (one process; multi-rank DDP always autocasts, FSDP casts through its
    # policy). bf16_copy: forward and backward run on a bf16 copy of the model, refreshed from
    # the fp32 weights after each optimizer step; each micro-batch's bf16 gradients are added
    # to fp32 ones. autocast: torch.autocast recasts the fp32 weights on every micro-batch and
    # keeps the residual stream, norms and activations in fp32.
    bf16_mode: Literal["bf16_copy", "autocast"] = "bf16_copy"
    compile: bool = False
    log_every: int = 10
    # How the ranks share the work (gptrain/train/parallelize.py). ddp: every rank holds the
    # whole model, its gradients and optimizer state. fsdp: FSDP2 shards all three over the
    # ranks (bf16 compute with fp32 master weights and reductions when dtype is bf16).
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    # fsdp: ranks that one copy of the model is sharded over; 0: all of them. Fewer (e.g. the
    # GPUs of one node) is HSDP: sharded within each group, replicated across the groups.
    fsdp_shard_size: int = 0
    # fsdp: free a block's gathered parameters after its forward and gather them again for
    # its backward (less memory), or keep them until then (less communication).
    fsdp_reshard_after_forward: bool = True
    # Recompute activations in the backward pass instead of keeping them, per transformer block.
    # full: keep only each block's input; selective: also keep the matmul and attention outputs
    # (recompute norms, activation functions and the like: most of the saving, little recompute).
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    # One run writes a run directory: rank 0 holds RUN_DIR/lease.json, renewed every tenth of
    # this; a lease without a heartbeat for this long is taken over (gptrain.checkpoint.lease).
    lease_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _require(self.run_dir != "", "train.run_dir", self.run_dir, "must be a folder or URL")
        if (self.max_steps is None) == (self.max_tokens is None):
            both = self.max_steps is not None
            raise GptrainError(
                f"train.max_steps={self.max_steps!r}, train.max_tokens={self.max_tokens!r}: "
                + ("set only one of them (e.g. train.max_steps=null)" if both else "set one of them")
            )
        _require(self.max_steps is None or self.max_steps >= 1, "train.max_steps", self.max_steps, "must be >= 1")
        _require(self.max_tokens is None or self.max_tokens >= 1, "train.max_tokens", self.max_tokens, "must be >= 1")
        _require(self.micro_batch_size >= 1, "train.micro_batch_size", self.micro_batch_size, "must be >= 1")
        _require(self.grad_accum_steps >= 1, "train.grad_accum_steps", self.grad_accum_steps, "must be >= 1")
        _non_negative("train.seed", self.seed)
        _require(self.log_every >= 1, "train.log_every", self.log_every, "must be >= 1")
        _non_negative("train.fsdp_shard_size", self.fsdp_shard_size, " (0: all ranks)")
        _positive("train.lease_timeout_s", self.lease_timeout_s)

    def resolved_device(self) -> Literal["cpu", "cuda"]:
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise GptrainError("train.device='cuda': no CUDA device is available")
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_dtype(self, device_type: str) -> Literal["bf16", "fp32"]:
        from gptrain.device import has_native_bf16

        if self.dtype == "auto":
            return "bf16" if has_native_bf16(device_type) else "fp32"
        return self.dtype


@dataclass(frozen=True)
class EvalConfig:
    every: int = 500  # optimizer steps between evaluations; 0: only at the end
    max_windows: int = 100  # context windows of the validation split per evaluation
    sample_prompt: str = "Every effort moves you"  # "" skips the text sample
    sample_max_new_tokens: int = 50
    # Sampled, not greedy: greedy decoding of a small or young model loops on one token
    # (often a newline). sample_temperature=0 picks greedily; the sample is seeded (train.seed).
    sample_temperature: float = 0.8
    sample_top_k: int | None = 40  # sample among the k most likely tokens; null: among all

    def __post_init__(self) -> None:
        _non_negative("eval.every", self.every, " (0: only at the end)")
        _require(self.max_windows >= 1, "eval.max_windows", self.max_windows, "must be >= 1")
        _non_negative("eval.sample_max_new_tokens", self.sample_max_new_tokens)
        _non_negative("eval.sample_temperature", self.sample_temperature)
        _require(self.sample_top_k is None or self.sample_top_k >= 1, "eval.sample_top_k", self.sample_top_k,
                 "must be >= 1, or null for no limit")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 1000  # optimizer steps between checkpoints; 0: only at the end and on preemption
    keep_last: int = 2  # rolling checkpoints kept; >= 2 so a torn newest one still leaves a good one
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this; 0: none
    async_save: bool = False
    resume: str = "auto"  # auto: the newest checkpoint in run_dir if any; none: start fresh; else a checkpoint URL
    init_from: str | None = None  # model weights folder to start from (fresh optimizer, step 0)

    def __post_init__(self) -> None:
        _non_negative("checkpoint.every", self.every, " (0: only at the end)")
        _require(self.keep_last >= 2, "checkpoint.keep_last", self.keep_last, "must be >= 2")
        _non_negative("checkpoint.keep_every", self.keep_every, " (0: none)")
        if self.keep_every:
            # Only steps that are saved at all can be kept permanently.
            _require(
                self.every > 0 and self.keep_every % self.every == 0,
                "checkpoint.keep_every", self.keep_every, f"must be a multiple of checkpoint.every ({self.every})",
            )
        _require(self.resume != "", "checkpoint.resume", self.resume, "must be 'auto', 'none' or a checkpoint URL")
        _require(self.init_from != "", "checkpoint.init_from", self.init_from, "must be a folder or URL, or null")


@dataclass(frozen=True)
class CommConfig:
    """How long the ranks of a multi-process run wait for each other before failing rather
    than hanging (gptrain.distributed): a rank that never arrives, or one that hangs alive."""

    # Joining: rank 0's host name resolving and every rank connecting to rank 0's store. Pods
    # and nodes start minutes apart when some still pull the image.
    init_timeout_s: float = 900.0
    # Any collective once joined (gradient all-reduce, checkpoint barriers): longer than the
    # slowest rank's checkpoint write or first shard download, short enough not to idle a gang.
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        _positive("comm.init_timeout_s", self.init_timeout_s)
        _positive("comm.timeout_s", self.timeout_s)


@dataclass(frozen=True)
class LoggingConfig:
    jsonl: bool = True  # metrics.jsonl in the run directory
    wandb: bool = False
    wandb_project: str = "gptrain"
    wandb_run_name: str | None = None
    wandb_tags: list[str] = field(default_factory=list)
    plot: bool = True  # loss curve PNG next to the metrics
    # Object stores cannot append: metrics.jsonl is rewritten at least this often (and before
    # every checkpoint commit). Local files get every record appended and synced at once.
    flush_every_s: float = 30.0

    def __post_init__(self) -> None:
        _require(self.wandb_project != "", "logging.wandb_project", self.wandb_project, "must not be empty")
        _positive("logging.flush_every_s", self.flush_every_s)


@dataclass(frozen=True)
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=1000))
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    comm: CommConfig = field(default_factory=CommConfig)

    def __post_init__(self) -> None:
        if self.optim.galore.enabled and self.train.parallelism == "fsdp":
            raise GptrainError(
                "optim.galore.enabled=true does not work with train.parallelism=fsdp: GaLore projects each "
                "weight's whole gradient matrix, and an FSDP rank holds only a shard of it; use train.parallelism=ddp"
            )
        for key in ("initial_lr", "min_lr"):
            value = getattr(self.schedule, key)
            peak = self.optim.lr
            _require(value <= peak, f"schedule.{key}", value, f"must be <= the peak optim.lr ({peak})")
        if self.train.max_steps is not None:
            self._check_warmup(self.train.max_steps)

    def tokens_per_step(self, world_size: int) -> int:
        """Tokens in one optimizer step across all ranks (every window is context_length long)."""
        context_length = self.model.resolve().context_length
        return self.train.micro_batch_size * self.train.grad_accum_steps * world_size * context_length

    def total_steps(self, tokens_per_step: int) -> int:
        """Optimizer steps in the run: max_steps, or the token budget divided into steps."""
        steps = self.train.max_steps or math.ceil(self.train.max_tokens / tokens_per_step)
        self._check_warmup(steps)
        return steps

    def _check_warmup(self, total_steps: int) -> None:
        warmup = self.schedule.warmup_steps
        _require(warmup <= total_steps, "schedule.warmup_steps", warmup, f"must be <= the run's {total_steps} steps")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build and validate from nested dicts (missing keys take their defaults)."""
        return _build(cls, data, "")


# ---------------------------------------------------------------------------------------------
# Building dataclasses from YAML values, with type checks that name the key at fault.


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        what = f"section {prefix!r}" if prefix else "the config"
        raise GptrainError(f"{what} must be a mapping of keys to values, got {data!r}")
    for key in data:
        _check_key(cls, key, prefix)
    hints = typing.get_type_hints(cls)
    return cls(**{key: _convert(value, hints[key], _join(prefix, key)) for key, value in data.items()})


# Keys that existed once: naming one gets this explanation rather than "unknown key".
RETIRED_KEYS = {
    "checkpoint.requeue": "requeueing moved out of gptrain: on exit status 75 the Slurm batch scripts "
    "requeue the job (at most GPTRAIN_MAX_REQUEUES times), submitit jobs are requeued by submitit "
    "and Kubernetes restarts the pods; remove the key",
}


def _check_key(cls: type, key: str, prefix: str) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    if _join(prefix, key) in RETIRED_KEYS:
        raise GptrainError(f"'{_join(prefix, key)}' was removed: {RETIRED_KEYS[_join(prefix, key)]}")
    if key not in valid:
        if prefix:
            raise GptrainError(f"unknown key '{prefix}.{key}'; valid keys in {prefix}: {', '.join(valid)}")
        raise GptrainError(f"unknown section {key!r}; valid sections: {', '.join(valid)}")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _convert(value: Any, hint: Any, key: str) -> Any:
    """`value` as type `hint`, or GptrainError naming the key, the value and the expected type.

    Numbers may arrive as strings: PyYAML reads `3e-4` (no dot) as a string, not a float.
    """
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        for option in typing.get_args(hint):
            if option is not type(None):
                try:
                    return _convert(value, option, key)
                except GptrainError:
                    pass
    elif origin is Literal:
        choices = typing.get_args(hint)
        if isinstance(value, str) and value in choices:
            return value
        raise GptrainError(f"{key}={value!r}: must be one of {', '.join(map(repr, choices))}")
    elif origin is list:
        if isinstance(value, list):
            (item_hint,) = typing.get_args(hint)
            return [_convert(item, item_hint, f"{key}[{i}]") for i, item in enumerate(value)]
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        number = _number(value)
        if number is not None and float(number).is_integer():
            return int(number)
    elif hint is float:
        number = _number(value)
        if number is not None:
            return float(number)
    elif hint is str:
        if isinstance(value, str):
            return value
    raise GptrainError(f"{key}={value!r}: expected {_describe(hint)}")


def _number(value: Any) -> int | float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value)
            except ValueError:
                pass
    return None


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    if origin is Literal:
        return " or ".join(map(repr, typing.get_args(hint)))
    if origin is list:
        return f"a list, each item {_describe(typing.get_args(hint)[0])}"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings (a config's to_dict()) as {dotted key: leaf value}."""
    if not isinstance(data, dict) or not data:
        return {prefix: data}
    flat = {}
    for key, value in data.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def _field_hint(path: str) -> Any:
    """The type of a dotted config key, checking every part of it exists."""
    hint: Any = RunConfig
    walked: list[str] = []
    for part in path.split("."):
        if not dataclasses.is_dataclass(hint):
            raise GptrainError(f"unknown key {path!r}: {'.'.join(walked)} has no sub-keys")
        _check_key(hint, part, ".".join(walked))
        hint = typing.get_type_hints(hint)[part]
        walked.append(part)
    return hint


def _accepts_str(hint: Any) -> bool:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return any(_accepts_str(option) for option in typing.get_args(hint))
    return hint is str


# ---------------------------------------------------------------------------------------------
# Loading: a preset or YAML file, then dotted overrides.


def shipped_yaml_names(folder: str) -> list[str]:
    """The YAML files shipped in the package folder gptrain/<folder>/, without .yaml."""
    shipped = importlib.resources.files("gptrain") / folder
    return sorted(p.name.removesuffix(".yaml") for p in shipped.iterdir() if p.name.endswith(".yaml"))


def shipped_yaml_text(folder: str, name: str) -> str:
    return (importlib.resources.files("gptrain") / folder / f"{name}.yaml").read_text()


def preset_names() -> list[str]:
    return shipped_yaml_names("presets")


def load_config(name_or_file: str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """A shipped preset (gptrain/presets/NAME.yaml) or a YAML file/URL, with `section.key=value` overrides."""
    if name_or_file in preset_names():
        source = f"preset {name_or_file!r}"
        text = shipped_yaml_text("presets", name_or_file)
    elif storage.exists(name_or_file):
        source = name_or_file
        text = storage.read_bytes(name_or_file).decode()
    else:
        presets = ", ".join(preset_names())
        raise GptrainError(f"config {name_or_file!r} is neither a shipped preset ({presets}) nor an existing YAML file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise GptrainError(f"{source}: not valid YAML ({err})") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise GptrainError(f"{source}: expected a mapping of sections (model:, optim:, ...), got {type(data).__name__}")
    for override in overrides:
        _apply_override(data, override)
    try:
        return RunConfig.from_dict(data)
    except GptrainError as err:
        with_overrides = f" with overrides {' '.join(overrides)}" if overrides else ""
        raise GptrainError(f"{source}{with_overrides}: {err}") from err


def _apply_override(data: dict[str, Any], override: str) -> None:
    path, sep, text = override.partition("=")
    if not sep or not path:
        raise GptrainError(f"override {override!r}: expected section.key=value, e.g. optim.lr=3e-4")
    value = _override_value(text, _field_hint(path))
    *parents, leaf = path.split(".")
    node = data
    for part in parents:
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise GptrainError(f"override {override!r}: {part!r} in the config file is not a mapping")
        node = node[part]
    node[leaf] = value


def _override_value(text: str, hint: Any) -> Any:
    """Parse an override's value as YAML, except that string keys take the text as written
    (so logging.wandb_run_name=2024 is the string '2024' and a prompt may contain ': ')."""
    if text in ("null", "~"):
        return None
    if _accepts_str(hint):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise GptrainError(f"override value {text!r}: not valid YAML ({err})") from err
