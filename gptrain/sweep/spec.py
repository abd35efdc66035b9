"""Sweep specs: a base config and the axes to vary, read from YAML and checked as a whole.

    name: debug-4                       # default: the file's name
    base: debug                         # a preset or a config YAML file/URL, as `gptrain train --config`
    overrides:                          # dotted keys set in every trial (the CLI's KEY=VALUE come after)
      train.max_steps: 40
    sweep_dir: runs/sweeps/debug-4      # default runs/sweeps/NAME; `--sweep-dir` replaces it
    grid:                               # every combination, the last axis varying fastest
      optim.lr: [1.0e-3, 3.0e-3]
    lists:                              # lists walked together (zipped): one more grid axis
      schedule.warmup_steps: [5, 10]
      schedule.initial_lr: [1.0e-4, 3.0e-4]
    random:                             # samples appended after the grid's points
      samples: 8
      seed: 0
      params:
        optim.weight_decay: {uniform: [0.0, 0.1]}
        model.dropout: {choice: [0.0, 0.1]}
    repeats: 3                          # each configuration with train.seed = base seed + 0, 1, 2
                                        # (or {seeds: [1, 2, 3]})
    budget: 40                          # at most 40 trials: the first ones in plan order, or
                                        # {trials: 40, select: random, seed: 0}: a seeded random subset
    epoch_tokens: dataset               # lets axes use the key `epochs`: train.max_tokens =
                                        # epochs x this (an integer, or `dataset`: its training tokens)

Axes name any dotted config key (gptrain.config); a key may be varied by only one of grid,
lists and random. Random samples draw every key under random.params: from
[low, high] (uniform), log-uniformly from [low, high] (log_uniform; both > 0), integers when
both bounds are integers, floats rounded to 4 significant digits (ids and tables stay
readable), or one of a list (choice). Sample j's value of a key depends only on (seed, j,
key), so raising `samples` keeps the earlier samples. Structure is checked here; the values are checked
against the config, trial by trial, when the sweep is planned (gptrain.sweep.plan).
"""

from __future__ import annotations

import json
import math
import posixpath
import random
import re
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from gptrain import storage
from gptrain.config import shipped_yaml_names, shipped_yaml_text
from gptrain.errors import GptrainError

EPOCHS_KEY = "epochs"  # the pseudo-key that epoch_tokens enables
SEED_KEY = "train.seed"  # what repeats vary
SPEC_KEYS = ("name", "base", "overrides", "sweep_dir", "grid", "lists", "random", "repeats", "budget", "epoch_tokens")
DISTRIBUTIONS = ("uniform", "log_uniform", "choice")
SIGNIFICANT_DIGITS = 4


class _SpecLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` (no dot) as a string; a spec full of learning rates reads it as a number."""


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


@dataclass(frozen=True)
class Distribution:
    kind: Literal["uniform", "log_uniform", "choice"]
    values: tuple[Any, ...]  # (low, high), or the choices

    def sample(self, rng: random.Random) -> Any:
        if self.kind == "choice":
            return self.values[rng.randrange(len(self.values))]
        low, high = self.values
        integers = all(isinstance(v, int) for v in self.values)
        if self.kind == "uniform":
            return rng.randint(low, high) if integers else _round(rng.uniform(low, high))
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
        return min(high, max(low, round(value))) if integers else _round(value)

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: list(self.values)}


def _round(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


@dataclass(frozen=True)
class RandomSearch:
    samples: int
    seed: int
    params: dict[str, Distribution]

    def point(self, number: int) -> dict[str, Any]:
        """Random sample `number`. Each value depends only on (seed, number, key): the same
        whatever the number of samples, the other keys or their order."""
        return {
            key: distribution.sample(random.Random(f"gptrain-sweep:{self.seed}:{number}:{key}"))
            for key, distribution in self.params.items()
        }


@dataclass(frozen=True)
class Budget:
    trials: int
    select: Literal["first", "random"] = "first"
    seed: int = 0


@dataclass(frozen=True)
class SweepSpec:
    source: str  # where it was read from, for messages
    name: str
    base: str
    overrides: dict[str, Any]
    sweep_dir: str
    grid: dict[str, list[Any]]
    lists: dict[str, list[Any]]
    random: RandomSearch | None
    repeats: int | list[int] | None  # a count (seeds = base seed + 0..n-1) or the seeds
    budget: Budget | None
    epoch_tokens: int | Literal["dataset"] | None

    @property
    def axis_keys(self) -> list[str]:
        """The varied keys in table order: grid, lists, random, then the repeats' seed."""
        keys = [*self.grid, *self.lists, *(self.random.params if self.random else {})]
        return keys + [SEED_KEY] * (self.repeats is not None)

    def to_dict(self) -> dict[str, Any]:
        """The spec as it would be written, the CLI's overrides included (saved as spec.yaml)."""
        data: dict[str, Any] = {"name": self.name, "base": self.base, "overrides": dict(self.overrides)}
        if self.grid:
            data["grid"] = {key: list(values) for key, values in self.grid.items()}
        if self.lists:
            data["lists"] = {key: list(values) for key, values in self.lists.items()}
        if self.random:
            params = {key: d.to_dict() for key, d in self.random.params.items()}
            data["random"] = {"samples": self.random.samples, "seed": self.random.seed, "params": params}
        if self.repeats is not None:
            data["repeats"] = self.repeats if isinstance(self.repeats, int) else {"seeds": list(self.repeats)}
        if self.budget:
            data["budget"] = {"trials": self.budget.trials, "select": self.budget.select, "seed": self.budget.seed}
        if self.epoch_tokens is not None:
            data["epoch_tokens"] = self.epoch_tokens
        return data

    def override_strings(self) -> list[str]:
        """`overrides` as the KEY=VALUE strings that gptrain.config.load_config takes."""
        return [f"{key}={_override_text(value)}" for key, value in self.overrides.items()]


def _override_text(value: Any) -> str:
    # load_config parses the text as YAML (JSON is YAML), or keeps it as is for string keys.
    return value if isinstance(value, str) else json.dumps(value)


# ---------------------------------------------------------------------------------------------
# Reading a spec.


def spec_names() -> list[str]:
    return shipped_yaml_names("sweeps")


def load_spec(name_or_file: str, overrides: list[str] | tuple[str, ...] = (), sweep_dir: str | None = None) -> SweepSpec:
    """A shipped spec (gptrain/sweeps/NAME.yaml) or a YAML file/URL, with KEY=VALUE config
    overrides for every trial and optionally another sweep folder."""
    if name_or_file in spec_names():
        source = f"sweep spec {name_or_file!r}"
        text = shipped_yaml_text("sweeps", name_or_file)
        default_name = name_or_file
    elif storage.exists(name_or_file):
        source = name_or_file
        text = storage.read_bytes(name_or_file).decode()
        default_name = posixpath.basename(name_or_file.rstrip("/")).removesuffix(".yaml").removesuffix(".yml")
    else:
        shipped = ", ".join(spec_names())
        raise GptrainError(f"sweep spec {name_or_file!r} is neither a shipped spec ({shipped}) nor an existing YAML file")
    try:
        data = yaml.load(text, Loader=_SpecLoader)
    except yaml.YAMLError as err:
        raise GptrainError(f"{source}: not valid YAML ({err})") from err
    try:
        return parse_spec(data, source, default_name, overrides, sweep_dir)
    except GptrainError as err:
        raise GptrainError(f"{source}: {err}") from err


def parse_spec(
    data: Any, source: str, default_name: str, cli_overrides: list[str] | tuple[str, ...] = (), sweep_dir: str | None = None
) -> SweepSpec:
    if not isinstance(data, dict):
        raise GptrainError(f"expected a mapping with keys {', '.join(SPEC_KEYS)}, got {type(data).__name__}")
    unknown = [key for key in data if key not in SPEC_KEYS]
    if unknown:
        raise GptrainError(f"unknown spec key {unknown[0]!r}; valid keys: {', '.join(SPEC_KEYS)}")
    if "base" not in data:
        raise GptrainError("'base' is missing: name a preset (e.g. debug) or a config YAML file")
    name = _string(data.get("name", default_name), "name")
    overrides = _mapping(data.get("overrides"), "overrides")
    for override in cli_overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise GptrainError(f"override {override!r}: expected section.key=value, e.g. data.path=DATASET")
        overrides[key] = text
    grid = {key: _axis(values, f"grid axis {key!r}") for key, values in _mapping(data.get("grid"), "grid").items()}
    lists = {key: _axis(values, f"lists axis {key!r}") for key, values in _mapping(data.get("lists"), "lists").items()}
    if len({len(values) for values in lists.values()}) > 1:
        lengths = ", ".join(f"{key}: {len(values)}" for key, values in lists.items())
        raise GptrainError(f"lists are walked together and need equal lengths ({lengths})")
    spec = SweepSpec(
        source=source,
        name=name,
        base=_string(data["base"], "base"),
        overrides=overrides,
        sweep_dir=sweep_dir or _string(data.get("sweep_dir", f"runs/sweeps/{name}"), "sweep_dir"),
        grid=grid,
        lists=lists,
        random=_random_search(data["random"]) if data.get("random") is not None else None,
        repeats=_repeats(data["repeats"]) if data.get("repeats") is not None else None,
        budget=_budget(data["budget"]) if data.get("budget") is not None else None,
        epoch_tokens=_epoch_tokens(data.get("epoch_tokens")),
    )
    _check_keys(spec)
    return spec


def _check_keys(spec: SweepSpec) -> None:
    seen: dict[str, str] = {}
    for where, keys in (("grid", spec.grid), ("lists", spec.lists), ("random.params", spec.random.params if spec.random else {})):
        for key in keys:
            if key in seen:
                raise GptrainError(f"{key!r} is varied by both {seen[key]} and {where}: give it one of them")
            seen[key] = where
    if spec.repeats is not None and SEED_KEY in seen:
        raise GptrainError(f"{SEED_KEY!r} is varied by {seen[SEED_KEY]} and by repeats: drop one of them")
    for key in [*seen, *spec.overrides]:
        if key == "train.run_dir":
            raise GptrainError("train.run_dir is set per trial (SWEEP_DIR/trials/INDEX-ID): do not set or vary it")
        if key == EPOCHS_KEY and spec.epoch_tokens is None:
            raise GptrainError(f"the key {EPOCHS_KEY!r} needs epoch_tokens (an integer, or `dataset`)")
    for key in spec.overrides:
        if key in seen:
            raise GptrainError(f"override {key!r} is varied by {seen[key]}: an override cannot fix a swept key")
    if EPOCHS_KEY in spec.overrides:
        raise GptrainError(f"{EPOCHS_KEY!r} can only be swept; for one length set train.max_tokens or train.max_steps")


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise GptrainError(f"{key}={value!r}: expected a non-empty string")
    return value


def _mapping(value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise GptrainError(f"{key}: expected a mapping of dotted config keys (e.g. optim.lr) to values, got {value!r}")
    return dict(value)


def _axis(values: Any, where: str) -> list[Any]:
    if not isinstance(values, list):
        raise GptrainError(f"{where}: expected a list of values, got {values!r}")
    if not values:
        raise GptrainError(f"{where} is empty: give it at least one value")
    return values


def _integer(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise GptrainError(f"{key}={value!r}: expected an integer >= {minimum}")
    return value


def _random_search(data: Any) -> RandomSearch:
    if not isinstance(data, dict) or set(data) - {"samples", "seed", "params"} or "samples" not in data:
        raise GptrainError(f"random: expected {{samples: N, seed: S, params: {{KEY: DISTRIBUTION}}}}, got {data!r}")
    params = _mapping(data.get("params"), "random.params")
    if not params:
        raise GptrainError("random.params is empty: give at least one key and its distribution")
    return RandomSearch(
        samples=_integer(data["samples"], "random.samples", 1),
        seed=_integer(data.get("seed", 0), "random.seed", 0),
        params={key: _distribution(value, f"random.params.{key}") for key, value in params.items()},
    )


def _distribution(data: Any, where: str) -> Distribution:
    usage = "expected one of {uniform: [LOW, HIGH]}, {log_uniform: [LOW, HIGH]}, {choice: [VALUES...]}"
    if not isinstance(data, dict) or len(data) != 1 or next(iter(data)) not in DISTRIBUTIONS:
        raise GptrainError(f"{where}={data!r}: {usage}")
    ((kind, values),) = data.items()
    if kind == "choice":
        return Distribution(kind, tuple(_axis(values, f"{where}.choice")))
    numbers = isinstance(values, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )
    if not numbers or len(values) != 2 or not values[0] < values[1]:
        raise GptrainError(f"{where}.{kind}={values!r}: expected [LOW, HIGH], two numbers with LOW < HIGH")
    if kind == "log_uniform" and values[0] <= 0:
        raise GptrainError(f"{where}.log_uniform={values!r}: LOW must be > 0 for a log-uniform distribution")
    return Distribution(kind, tuple(values))


def _repeats(data: Any) -> int | list[int]:
    if isinstance(data, dict) and set(data) == {"seeds"}:
        seeds = _axis(data["seeds"], "repeats.seeds")
        for seed in seeds:
            _integer(seed, "repeats.seeds[]", 0)
        if len(set(seeds)) != len(seeds):
            raise GptrainError(f"repeats.seeds={seeds!r}: a seed is listed twice")
        return list(seeds)
    if isinstance(data, int) and not isinstance(data, bool):
        return _integer(data, "repeats", 1)
    raise GptrainError(f"repeats={data!r}: expected a count (e.g. 3) or {{seeds: [1, 2, 3]}}")


def _budget(data: Any) -> Budget:
    if isinstance(data, int) and not isinstance(data, bool):
        return Budget(trials=_integer(data, "budget", 1))
    if not isinstance(data, dict) or "trials" not in data or set(data) - {"trials", "select", "seed"}:
        raise GptrainError(f"budget={data!r}: expected a trial count or {{trials: N, select: first|random, seed: S}}")
    select = data.get("select", "first")
    if select not in ("first", "random"):
        raise GptrainError(f"budget.select={select!r}: must be 'first' or 'random'")
    return Budget(_integer(data["trials"], "budget.trials", 1), select, _integer(data.get("seed", 0), "budget.seed", 0))


def _epoch_tokens(data: Any) -> int | Literal["dataset"] | None:
    if data is None or data == "dataset":
        return data
    if isinstance(data, str):
        raise GptrainError(f"epoch_tokens={data!r}: expected an integer, or 'dataset' (the training split's tokens)")
    return _integer(data, "epoch_tokens", 1)
