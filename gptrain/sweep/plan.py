"""The plan of a sweep: its numbered trials, each a validated config, and the sweep folder.

Order: the grid's points (product of the grid axes and the zipped lists, the last axis
varying fastest), then the random samples in sample order, each configuration once per
repeat seed; then the budget keeps the first configurations or a seeded random subset (in
plan order). A trial's id is a short hash of the values it sets, so it names the same
configuration in any plan; its index is its position in this order, stable because the
plan is a pure function of the spec and the base config.

Every trial's config is built and validated (gptrain.config) before anything runs, so a
value the config refuses stops the sweep with a message naming the trial and the key.

The sweep folder (any fsspec URL):

    SWEEP_DIR/spec.yaml                 the spec as run, CLI overrides included
    SWEEP_DIR/trials.json               this plan: the base config and every trial's values
    SWEEP_DIR/trials/INDEX-ID/          trial INDEX's train.run_dir

A sweep folder belongs to one plan: running a spec whose spec or base config differs from the
one in trials.json is refused (their trials would mix in one table), naming what differs.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import random
from dataclasses import dataclass
from typing import Any

import yaml

from gptrain import storage
from gptrain.config import RunConfig, flatten, load_config
from gptrain.errors import GptrainError
from gptrain.sweep.spec import EPOCHS_KEY, SEED_KEY, SweepSpec, load_spec

log = logging.getLogger("gptrain.sweep")

FORMAT = "gptrain-sweep/1"
SPEC_FILE = "spec.yaml"
PLAN_FILE = "trials.json"
TRIALS_DIR = "trials"


@dataclass(frozen=True)
class Trial:
    index: int
    id: str
    params: dict[str, Any]  # the values this trial sets, as the config reads them

    @property
    def folder(self) -> str:
        """Its run directory, relative to the sweep folder."""
        return f"{TRIALS_DIR}/{self.index}-{self.id}"

    def describe(self) -> str:
        return describe(self.params)


def describe(params: dict[str, Any]) -> str:
    return " ".join(f"{key}={value}" for key, value in params.items()) or "(the base config)"


@dataclass(frozen=True)
class SweepPlan:
    sweep_dir: str
    spec: dict[str, Any]  # SweepSpec.to_dict()
    base_config: dict[str, Any]  # the base with the spec's and the CLI's overrides, resolved
    epoch_tokens: int | None  # training tokens per epoch when the spec sweeps `epochs`
    params: list[str]  # the varied keys, in table order
    summary: str  # how the trials came about, in words
    trials: list[Trial]

    @property
    def name(self) -> str:
        return self.spec["name"]

    def trial(self, index: int) -> Trial:
        if not 0 <= index < len(self.trials):
            raise GptrainError(f"trial index {index} is outside 0..{len(self.trials) - 1} (sweep {self.name!r})")
        return self.trials[index]

    def trial_url(self, trial: Trial) -> str:
        return storage.join(self.sweep_dir, *trial.folder.split("/"))

    def trial_config(self, trial: Trial) -> RunConfig:
        return build_trial_config(self.base_config, trial.params, self.epoch_tokens, self.trial_url(trial))

    def header(self) -> dict[str, Any]:
        return plan_header(self.spec, self.base_config, self.epoch_tokens)

    def to_json(self) -> dict[str, Any]:
        trials = [{"index": t.index, "id": t.id, "params": t.params, "run_dir": t.folder} for t in self.trials]
        return {"format": FORMAT, **self.header(), "params": self.params, "summary": self.summary, "trials": trials}

    @classmethod
    def from_json(cls, data: dict[str, Any], sweep_dir: str) -> SweepPlan:
        # JSON files keep keys sorted; the params go back into table order.
        order = data["params"]
        trials = [Trial(t["index"], t["id"], {k: t["params"][k] for k in order if k in t["params"]})
                  for t in data["trials"]]
        return cls(sweep_dir, data["spec"], data["base_config"], data["epoch_tokens"], data["params"],
                   data["summary"], trials)


def plan_header(spec: dict[str, Any], base_config: dict[str, Any], epoch_tokens: int | None) -> dict[str, Any]:
    """What identifies a plan: equal headers give equal trials."""
    return {"spec": spec, "base_config": base_config, "epoch_tokens": epoch_tokens}


def build_trial_config(base: dict[str, Any], params: dict[str, Any], epoch_tokens: int | None, run_dir: str) -> RunConfig:
    data = copy.deepcopy(base)
    for key, value in params.items():
        if key == EPOCHS_KEY:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise GptrainError(f"{EPOCHS_KEY}={value!r}: expected a number of epochs > 0")
            _set(data, "train.max_tokens", max(1, round(value * epoch_tokens)))
            _set(data, "train.max_steps", None)
        else:
            _set(data, key, value)
    _set(data, "train.run_dir", run_dir)
    return RunConfig.from_dict(data)


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        data = data[part]
    data[leaf] = value


def _get(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


# ---------------------------------------------------------------------------------------------
# Planning.


def make_plan(spec: SweepSpec) -> SweepPlan:
    """Every trial of `spec`, each config validated; GptrainError naming the first bad one."""
    base = resolve_base(spec)
    return _plan_trials(spec, base, resolve_epoch_tokens(spec, base))


def _plan_trials(spec: SweepSpec, base: dict[str, Any], epoch_tokens: int | None) -> SweepPlan:
    for key in spec.axis_keys:
        _check_config_key(base, key, spec.source)
    points, how = _points(spec)
    seeds = _repeat_seeds(spec, base)
    points, budget_note = _apply_budget(spec, points, len(seeds or [None]))
    trials: list[Trial] = []
    first_with_id: dict[str, int] = {}
    for point in points:
        for seed in seeds or [None]:
            raw = point if seed is None else {**point, SEED_KEY: seed}
            index = len(trials)
            try:
                config = build_trial_config(base, raw, epoch_tokens, "validation").to_dict()
            except GptrainError as err:
                raise GptrainError(f"{spec.source}: trial {index} ({describe(raw)}): {err}") from err
            params = {key: value if key == EPOCHS_KEY else _get(config, key) for key, value in raw.items()}
            trial = Trial(index, trial_id(params), params)
            if trial.id in first_with_id:
                raise GptrainError(f"{spec.source}: trials {first_with_id[trial.id]} and {index} are the same "
                                   f"({describe(params)}): an axis lists a value twice")
            first_with_id[trial.id] = index
            trials.append(trial)
    if seeds:
        how.append(f"x {len(seeds)} seeds ({SEED_KEY} {', '.join(map(str, seeds))})")
    summary = "; ".join(how + budget_note + [f"{len(trials)} trial(s)"])
    return SweepPlan(spec.sweep_dir, spec.to_dict(), base, epoch_tokens, spec.axis_keys, summary, trials)


def trial_id(params: dict[str, Any]) -> str:
    """8 hex digits of a hash of the values a trial sets (order-independent)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]


def resolve_base(spec: SweepSpec) -> dict[str, Any]:
    try:
        return load_config(spec.base, spec.override_strings()).to_dict()
    except GptrainError as err:
        raise GptrainError(f"{spec.source}: base {spec.base!r}: {err}") from err


def resolve_epoch_tokens(spec: SweepSpec, base: dict[str, Any]) -> int | None:
    """Tokens per epoch: the spec's number, or the training split of data.path."""
    if spec.epoch_tokens != "dataset":
        return spec.epoch_tokens
    from gptrain.data.manifest import load_manifest

    path = base["data"]["path"]
    if path is None:
        raise GptrainError(f"{spec.source}: epoch_tokens: dataset needs data.path (pass data.path=DATASET)")
    return int(load_manifest(path)["splits"]["train"]["tokens"])


def _check_config_key(base: dict[str, Any], key: str, source: str) -> None:
    """A varied key must exist in the config (the epochs pseudo-key aside)."""
    if key == EPOCHS_KEY:
        return
    node: Any = base
    parts = key.split(".")
    for depth, part in enumerate(parts):
        section = ".".join(parts[:depth])
        if not isinstance(node, dict):
            raise GptrainError(f"{source}: unknown config key {key!r}: {section} has no sub-keys")
        if part not in node:
            where = f"in {section}" if section else "sections"
            raise GptrainError(f"{source}: unknown config key {key!r}; valid {where}: {', '.join(node)}")
        node = node[part]


def _points(spec: SweepSpec) -> tuple[list[dict[str, Any]], list[str]]:
    """The configurations before repeats and budget, and how they came about."""
    axes = [[{key: value} for value in values] for key, values in spec.grid.items()]
    if spec.lists:
        length = len(next(iter(spec.lists.values())))
        axes.append([{key: values[i] for key, values in spec.lists.items()} for i in range(length)])
    how = []
    points: list[dict[str, Any]] = []
    if axes:
        points = [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*axes)]
        how.append(f"grid {' x '.join(str(len(axis)) for axis in axes)} = {len(points)} point(s)")
    if spec.random:
        seen = {json.dumps(point, sort_keys=True) for point in points}
        duplicates = 0
        for number in range(spec.random.samples):
            sample = spec.random.point(number)
            key = json.dumps(sample, sort_keys=True)
            duplicates += key in seen
            if key not in seen:
                seen.add(key)
                points.append(sample)
        dropped = f", {duplicates} duplicate(s) dropped" if duplicates else ""
        how.append(f"{spec.random.samples} random sample(s) (seed {spec.random.seed}{dropped})")
    if not points:
        points, how = [{}], ["the base config alone"]
    return points, how


def _repeat_seeds(spec: SweepSpec, base: dict[str, Any]) -> list[int] | None:
    if spec.repeats is None or isinstance(spec.repeats, list):
        return spec.repeats
    return [base["train"]["seed"] + i for i in range(spec.repeats)]


def _apply_budget(spec: SweepSpec, points: list[dict[str, Any]], repeats: int) -> tuple[list[dict[str, Any]], list[str]]:
    budget = spec.budget
    if budget is None:
        return points, []
    keep = budget.trials // repeats
    if keep == 0:
        raise GptrainError(f"{spec.source}: budget.trials={budget.trials} is below one configuration's {repeats} repeats")
    if keep >= len(points):
        return points, [f"budget {budget.trials} trials: all kept"]
    if budget.select == "first":
        return points[:keep], [f"budget {budget.trials} trials: the first {keep} of {len(points)} configurations"]
    chosen = sorted(random.Random(budget.seed).sample(range(len(points)), keep))
    note = f"budget {budget.trials} trials: a random {keep} of {len(points)} configurations (seed {budget.seed})"
    return [points[i] for i in chosen], [note]


# ---------------------------------------------------------------------------------------------
# The sweep folder.


def open_sweep(spec: SweepSpec, write: bool = True) -> SweepPlan:
    """The plan of `spec` in its sweep folder: the stored one when the folder has it (its
    trials were validated when it was written), else a new one, written there when `write`.
    A folder planned from another spec or base config is an error naming what differs."""
    base = resolve_base(spec)
    epoch_tokens = resolve_epoch_tokens(spec, base)
    header = plan_header(spec.to_dict(), base, epoch_tokens)
    plan_url = storage.join(spec.sweep_dir, PLAN_FILE)
    if storage.exists(plan_url):
        stored = read_plan_json(plan_url)
        # JSON round trip: compare like with like (tuples become lists).
        differences = _differences({k: stored.get(k) for k in header}, json.loads(json.dumps(header)))
        if differences:
            raise GptrainError(
                f"{spec.sweep_dir} holds a sweep planned differently ({'; '.join(differences[:5])}): "
                "use another sweep folder (--sweep-dir) or the same spec and overrides"
            )
        return SweepPlan.from_json(stored, spec.sweep_dir)
    plan = _plan_trials(spec, base, epoch_tokens)
    if write:
        storage.write_bytes_atomic(storage.join(spec.sweep_dir, SPEC_FILE), yaml.safe_dump(plan.spec, sort_keys=False).encode())
        storage.write_json_atomic(plan_url, plan.to_json())
        log.info("planned %s: %s -> %s", plan.name, plan.summary, plan_url)
    return plan


def open_spec(spec: str, overrides: list[str], sweep_dir: str | None, write: bool) -> SweepPlan:
    """`open_sweep` for a shipped spec name or YAML file/URL with KEY=VALUE overrides for every
    trial: what `gptrain sweep` and the submitit launcher open."""
    return open_sweep(load_spec(spec, overrides, sweep_dir), write=write)


def load_plan(sweep_dir: str) -> SweepPlan:
    """The plan stored in a sweep folder (by `gptrain sweep run`)."""
    plan_url = storage.join(sweep_dir, PLAN_FILE)
    if not storage.exists(plan_url):
        raise GptrainError(f"{plan_url} is missing: {sweep_dir} is not a sweep folder (run `gptrain sweep run` first)")
    return SweepPlan.from_json(read_plan_json(plan_url), sweep_dir)


def read_plan_json(url: str) -> dict[str, Any]:
    try:
        data = storage.read_json(url)
    except ValueError as err:
        raise GptrainError(str(err)) from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise GptrainError(f"{url}: not a gptrain sweep plan (format is not {FORMAT!r})")
    return data


def _differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    old, new = flatten(stored), flatten(current)
    return [f"{key}: {old.get(key)!r} there, {new.get(key)!r} now" for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key)]
