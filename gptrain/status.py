"""`gptrain status RUN_DIR`: where a run stands, at a glance (a folder or URL such as s3://).

    gptrain status runs/demo
    gptrain status s3://bucket/runs/gpt2 --json          # the same, as one JSON object
    gptrain status runs/sweeps/debug-4                   # a sweep folder: one line per trial

It reads what the run writes for anyone to read (config.yaml, metrics.jsonl, the checkpoint
folders and their commit markers) and changes nothing, so it is safe while the run trains.
The state is one of:
  finished    the run's last metrics record says it reached its last step
  preempted   ... says a signal stopped it at a checkpoint (rerun the command to resume)
  running     metrics arrived lately
  stalled     no new metrics for longer than --stalled-after (by default 5 times the usual
              gap between metrics writes, at least 10 minutes): killed, hung, or waiting
  starting    the run directory exists but no metrics were logged yet
A checkpoint is committed once its commit marker is written; the newest usable one is the
newest committed checkpoint whose files are all there with their recorded sizes, the one a
rerun resumes from.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from gptrain import storage
from gptrain.checkpoint import commit as commits
from gptrain.cli import add_documented_command
from gptrain.config import RunConfig
from gptrain.errors import GptrainError
from gptrain.train.logger import CONFIG_FILE, METRICS_FILE, PLOT_FILE, read_metrics

MIN_STALL_S = 600.0  # below this a gap in the metrics may be a long evaluation or checkpoint save
STALL_GAPS = 5  # stalled after this many usual gaps between metrics writes without one
SPEED_RECORDS = 5  # tokens/s: the mean of the last few train records (each covers log_every steps)
SPARK_LEVELS = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 40


@dataclass
class CheckpointInfo:
    step: int
    url: str
    committed: bool
    size_bytes: int
    committed_at: float | None = None  # seconds since the epoch
    problem: str | None = None  # why a committed checkpoint cannot be used
    usable: bool = False  # the newest committed checkpoint with intact files


@dataclass
class RunStatus:
    run_dir: str
    state: str  # finished, preempted, running, stalled, starting
    step: int | None = None
    total_steps: int | None = None
    tokens_seen: int | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    val_ppl: float | None = None
    val_step: int | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None  # while running
    seconds_since_update: float | None = None  # since metrics.jsonl (or config.yaml) last changed
    stalled_after_s: float | None = None  # the threshold used
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    newest_usable_step: int | None = None
    wandb: bool = False
    wandb_run_id: str | None = None
    loss_sparkline: str = ""
    first_train_loss: float | None = None
    plot: str | None = None
    last_save: dict[str, Any] | None = None  # the newest "checkpoint" record of metrics.jsonl: its stall

    def to_json(self) -> dict[str, Any]:
        """As plain JSON values: a diverged (NaN or infinite) loss becomes null."""
        return _finite(dataclasses.asdict(self))


def run_status(run_dir: str, stalled_after_s: float | None = None, now: float | None = None) -> RunStatus:
    """What RUN_DIR's files say about the run; a GptrainError naming RUN_DIR when it is none."""
    now = time.time() if now is None else now
    config_url, metrics_url = storage.join(run_dir, CONFIG_FILE), storage.join(run_dir, METRICS_FILE)
    if not storage.exists(run_dir):
        raise GptrainError(f"{run_dir}: no such run directory")
    config = _read_config(config_url) if storage.exists(config_url) else None
    has_checkpoints = storage.exists(commits.checkpoints_url(run_dir))
    if config is None and not storage.exists(metrics_url) and not has_checkpoints:
        raise GptrainError(f"{run_dir}: not a gptrain run directory (no {CONFIG_FILE}, {METRICS_FILE} or checkpoints/)")

    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    saves = [r for r in records if r.get("kind") == "checkpoint"]
    status = RunStatus(run_dir=run_dir, state="starting", checkpoints=_checkpoints(run_dir) if has_checkpoints else [])
    usable = [c for c in status.checkpoints if c.usable]
    status.newest_usable_step = usable[0].step if usable else None
    if train:
        last = train[-1]
        status.step, status.tokens_seen, status.train_loss = last["step"], last["tokens_seen"], last["loss"]
        status.first_train_loss = train[0]["loss"]
        speeds = [r["tokens_per_s"] for r in train[-SPEED_RECORDS:] if r.get("tokens_per_s")]
        status.tokens_per_s = sum(speeds) / len(speeds) if speeds else None
        status.loss_sparkline = sparkline([r["loss"] for r in train])
    if saves:
        status.last_save = saves[-1]
    if evals:
        status.val_loss, status.val_ppl, status.val_step = evals[-1]["val_loss"], evals[-1]["val_ppl"], evals[-1]["step"]
        status.step = max(status.step or 0, evals[-1]["step"])
    tokens_per_step = last["tokens_seen"] / last["step"] if train else None
    if config is not None:
        status.total_steps = config.train.max_steps or (
            math.ceil(config.train.max_tokens / tokens_per_step) if tokens_per_step else None
        )
        status.wandb = config.logging.wandb
        if config.logging.plot:
            status.plot = storage.join(run_dir, PLOT_FILE)

    ended = records[-1] if records and records[-1].get("kind") == "end" else None
    updated = _modified_time(metrics_url) or _modified_time(config_url)
    status.seconds_since_update = None if updated is None else max(0.0, now - updated)
    if ended is not None:
        status.state = ended["status"]
        status.wandb_run_id = ended.get("wandb_run_id")
    else:
        seconds_per_step = tokens_per_step / status.tokens_per_s if tokens_per_step and status.tokens_per_s else None
        status.stalled_after_s = stalled_after_s if stalled_after_s is not None else _stall_threshold(
            config, run_dir, seconds_per_step
        )
        if status.seconds_since_update is not None and status.seconds_since_update > status.stalled_after_s:
            status.state = "stalled"
        elif records:
            status.state = "running"
        if status.state == "running" and status.total_steps and seconds_per_step and status.step is not None:
            status.eta_s = max(0, status.total_steps - status.step) * seconds_per_step
    if status.wandb and status.wandb_run_id is None:
        status.wandb_run_id = _local_wandb_run_id(run_dir)
    return status


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _read_config(url: str) -> RunConfig:
    try:
        return RunConfig.from_dict(yaml.safe_load(storage.read_bytes(url)))
    except (GptrainError, yaml.YAMLError) as err:
        raise GptrainError(f"{url}: not a valid run config ({err})") from err


def _checkpoints(run_dir: str) -> list[CheckpointInfo]:
    """Every step folder, newest first; the newest committed one with intact files is marked usable."""
    found = []
    for step, url in reversed(commits.step_folders(run_dir)):
        try:
            commit = commits.read_commit(url)
        except commits.NotCommittedError:  # a save in flight, or one cut short
            found.append(CheckpointInfo(step, url, committed=False, size_bytes=sum(commits.list_files(url).values())))
            continue
        except commits.CheckpointError as err:
            found.append(CheckpointInfo(step, url, committed=True, size_bytes=0, problem=str(err)))
            continue
        info = CheckpointInfo(step, url, committed=True, size_bytes=sum(f.size for f in commit.files.values()),
                              committed_at=commit.time)
        if not any(c.usable for c in found):  # verify only down to the newest usable one
            try:
                commits.verify_sizes(commit)  # a look, not a load: no reading every byte for the sha256s
                info.usable = True
            except commits.CheckpointError as err:
                info.problem = str(err)
        found.append(info)
    return found


def _modified_time(url: str) -> float | None:
    """When the file last changed (seconds since the epoch), on local disks and object stores."""
    fs, path = storage.filesystem(url)
    fs.invalidate_cache(posixpath.dirname(path))  # another process writes it
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, datetime.datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _stall_threshold(config: RunConfig | None, run_dir: str, seconds_per_step: float | None) -> float:
    """STALL_GAPS usual gaps between metrics writes, at least MIN_STALL_S. A local metrics.jsonl
    grows every train.log_every steps; on object stores it is rewritten at each evaluation."""
    if config is None or seconds_per_step is None:
        return MIN_STALL_S
    steps_between_writes = config.train.log_every if storage.is_local(run_dir) else (
        config.eval.every or config.train.max_steps or 0
    )
    return max(MIN_STALL_S, STALL_GAPS * steps_between_writes * seconds_per_step)


def _local_wandb_run_id(run_dir: str) -> str | None:
    """A running run's W&B id from the files W&B keeps in a local run directory:
    wandb/run-<time>-<id>/ (offline-run-... offline); the newest folder is the current attempt."""
    if not storage.is_local(run_dir):
        return None
    folder = os.path.join(run_dir, "wandb")
    runs = sorted(
        name for name in (os.listdir(folder) if os.path.isdir(folder) else [])
        if name.startswith(("run-", "offline-run-")) and os.path.isdir(os.path.join(folder, name))
    )
    return runs[-1].rsplit("-", 1)[1] if runs else None


def sparkline(values: list[float], width: int = SPARK_WIDTH) -> str:
    """`values` as one line of block characters, in at most `width` buckets (each the mean of
    its values); non-finite values (a diverged loss) show as '!'."""
    if not values:
        return ""
    buckets = min(width, len(values))
    means = []
    for i in range(buckets):
        chunk = values[i * len(values) // buckets:(i + 1) * len(values) // buckets]
        means.append(sum(chunk) / len(chunk))
    finite = [m for m in means if math.isfinite(m)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 0.0)
    top = len(SPARK_LEVELS) - 1
    return "".join(
        "!" if not math.isfinite(m) else SPARK_LEVELS[round((m - low) / (high - low) * top) if high > low else 0]
        for m in means
    )


# --- sweep folders --------------------------------------------------------------------------


def is_sweep_dir(url: str) -> bool:
    from gptrain.sweep.plan import PLAN_FILE

    return storage.exists(storage.join(url, PLAN_FILE))


def sweep_status(sweep_dir: str, stalled_after_s: float | None = None) -> dict[str, Any]:
    """{"sweep_dir", "name", "trials": [{"index", "id", "params", "trial_status", **RunStatus}]}.
    trial_status is the trial record's (done, failed, preempted, running) or "not started"."""
    from gptrain.sweep.plan import load_plan
    from gptrain.sweep.run import read_trial_record

    plan = load_plan(sweep_dir)
    now = time.time()
    trials = []
    for trial in plan.trials:
        url = plan.trial_url(trial)
        record = read_trial_record(plan, trial)
        entry = {"index": trial.index, "id": trial.id, "params": trial.params,
                 "trial_status": record["status"] if record else "not started"}
        try:
            entry |= run_status(url, stalled_after_s, now).to_json()
        except GptrainError:  # no run files yet: never started, or its process is starting up
            entry |= RunStatus(run_dir=url, state="starting" if record else "not started").to_json()
        if entry["trial_status"] == "failed":
            entry["state"] = "failed"  # the trial record knows it ended with an error
        trials.append(entry)
    return {"sweep_dir": sweep_dir, "name": plan.name, "trials": trials}


# --- text -----------------------------------------------------------------------------------


def describe_run(status: RunStatus) -> str:
    lines = [f"{status.run_dir}: {status.state}{_progress(status)}"]
    if status.state == "stalled":
        lines[0] += f" (no new metrics for {_duration(status.seconds_since_update)}: killed or hung?)"

    def row(label: str, text: str) -> None:
        lines.append(f"  {label:<13}{text}")

    if status.tokens_seen is not None:
        row("tokens seen", f"{status.tokens_seen:,}")
    if status.train_loss is not None:
        row("train loss", f"{status.train_loss:.4f} (step {status.step})")
    if status.val_loss is not None:
        row("val loss", f"{status.val_loss:.4f}, perplexity {status.val_ppl:,.1f} (step {status.val_step})")
    if status.loss_sparkline:
        row("loss curve", f"{status.loss_sparkline}  {status.first_train_loss:.2f} -> {status.train_loss:.2f}")
    if status.tokens_per_s:
        row("speed", f"{status.tokens_per_s:,.0f} tokens/s")
    if status.eta_s is not None:
        row("ETA", _duration(status.eta_s))
    if status.seconds_since_update is not None:
        row("last metrics", f"{_duration(status.seconds_since_update)} ago")
    row("checkpoints", "; ".join(_describe_checkpoint(c) for c in status.checkpoints) or "none yet")
    if status.last_save is not None:
        save = status.last_save
        background = f", written in the background in {save['write_s']:.2f} s" if save["async"] else ""
        row("last save", f"step {save['step']}, {'async' if save['async'] else 'sync'}: "
                         f"training stalled {save['stall_s']:.2f} s{background}")
    row("W&B run", (status.wandb_run_id or "id not known yet") if status.wandb else "off (logging.wandb=false)")
    if status.plot:
        row("plot", status.plot)
    return "\n".join(lines)


def describe_sweep(sweep: dict[str, Any]) -> str:
    trials = sweep["trials"]
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial["state"]] = counts.get(trial["state"], 0) + 1
    lines = [f"{sweep['sweep_dir']}: sweep {sweep['name']!r}, {len(trials)} trials ("
             + ", ".join(f"{n} {state}" for state, n in counts.items()) + ")"]
    for trial in trials:
        status = RunStatus(**{k: v for k, v in trial.items() if k in _RUN_FIELDS})
        val = f"val {status.val_loss:.4f}" if status.val_loss is not None else ""
        loss = f"train {status.train_loss:.4f}" if status.train_loss is not None else ""
        usable = f"ckpt step-{status.newest_usable_step}" if status.newest_usable_step is not None else ""
        cells = [f"{trial['index']:>3}-{trial['id']}", f"{status.state:<11}", _progress(status).strip(", "),
                 loss, val, status.loss_sparkline, usable]
        lines.append("  " + "  ".join(c for c in cells if c))
    return "\n".join(lines)


_RUN_FIELDS = {f.name for f in dataclasses.fields(RunStatus)}


def _progress(status: RunStatus) -> str:
    if status.step is None:
        return ""
    if status.total_steps:
        return f", step {status.step:,}/{status.total_steps:,} ({100 * status.step / status.total_steps:.0f}%)"
    return f", step {status.step:,}"


def _describe_checkpoint(c: CheckpointInfo) -> str:
    if not c.committed:
        what = "uncommitted (a save in flight or cut short)"
    elif c.problem:
        what = f"damaged: {c.problem}"
    else:
        what = "committed" + (", newest usable" if c.usable else "")
    return f"step-{c.step} {_size(c.size_bytes)} {what}"


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


# --- command --------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_documented_command(subparsers, "status", "where a run (or each trial of a sweep) stands", __doc__)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory or sweep folder; path or URL")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    parser.add_argument("--stalled-after", type=float, default=None, metavar="SECONDS",
                        help="call a run stalled after this long without new metrics (default: see the notes below)")
    parser.set_defaults(func=run_status_command)


def run_status_command(args: argparse.Namespace) -> int:
    if args.stalled_after is not None and args.stalled_after < 0:
        raise GptrainError(f"--stalled-after {args.stalled_after:g}: must be >= 0")
    if is_sweep_dir(args.run_dir):
        sweep = sweep_status(args.run_dir, args.stalled_after)
        print(json.dumps(sweep, indent=2, allow_nan=False) if args.json else describe_sweep(sweep))
    else:
        status = run_status(args.run_dir, args.stalled_after)
        print(json.dumps(status.to_json(), indent=2, allow_nan=False) if args.json else describe_run(status))
    return 0
