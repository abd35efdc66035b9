"""Where the trainer's metrics go: console lines, RUN_DIR/metrics.jsonl and Weights & Biases.

Only rank 0 creates a `MetricsLogger` that writes; the other ranks get one with
`enabled=False`, which drops everything, so the trainer calls it unconditionally.

metrics.jsonl holds one JSON object per line: {"kind": "train", "step", "loss", ...} every
`train.log_every` steps, {"kind": "eval", "step", "val_loss", ...} at each evaluation,
{"kind": "checkpoint", "step", "async", "stall_s", "write_s", "copy_s", "url"} once a
checkpoint is committed (an async one: at the next save; stall_s is how long training waited
for it, write_s how long the save took to commit, copy_s how much of that an async save spent
copying the state to CPU memory), and {"kind": "end", "status": "finished" or
"preempted", ...} when the process ends its run.
On a local run directory each record is appended and fsynced as it is logged, so a crash
loses none. Object stores cannot append: there the whole file is rewritten by
`flush_metrics()`, at least every `logging.flush_every_s` seconds, at each evaluation and
before every checkpoint commit (the trainer calls it before saving), so a resumed run never
has a gap below its checkpoint's step.

A resumed run keeps the records up to its checkpoint's step and drops later ones at once
(logged by a process that died before its next checkpoint: those steps are trained again),
so every step is in the file exactly once, and continues the same W&B run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

from gptrain import storage
from gptrain.config import RunConfig
from gptrain.errors import GptrainError
from gptrain.train.plot import write_loss_plot

log = logging.getLogger("gptrain")

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
PLOT_FILE = "loss.png"


class MetricsLogger:
    def __init__(
        self, config: RunConfig, enabled: bool, resume_step: int | None = None, wandb_run_id: str | None = None
    ):
        self.config, self.enabled = config, enabled
        self.run_dir = config.train.run_dir
        self.records: list[dict[str, Any]] = []
        self._local = storage.is_local(self.run_dir)
        self._wandb_run = None
        self._unflushed = 0  # records not yet in metrics.jsonl on an object store
        self._flushed_at = time.monotonic()
        if not enabled:
            return
        wandb = _import_wandb() if config.logging.wandb else None  # fails before anything is written
        with storage.faults_named(self.run_dir):
            storage.write_bytes_atomic(storage.join(self.run_dir, CONFIG_FILE), config.to_yaml().encode())
            if resume_step is not None and config.logging.jsonl:
                self.records = [r for r in read_metrics(self.run_dir) if r["step"] <= resume_step]
            if config.logging.jsonl:  # empty for a fresh run; the records kept for a resumed one
                storage.write_bytes_atomic(self.metrics_url, _jsonl(self.records))
        if wandb is not None:
            self._wandb_run = _start_wandb(wandb, config, wandb_run_id)

    @property
    def wandb_run_id(self) -> str | None:
        return self._wandb_run.id if self._wandb_run is not None else None

    @property
    def metrics_url(self) -> str:
        return storage.join(self.run_dir, METRICS_FILE)

    def info(self, message: str) -> None:
        if self.enabled:
            log.info(message)

    def log(self, record: dict[str, Any]) -> None:
        """One record: to metrics.jsonl, to W&B (numbers, keyed by step), and a console line."""
        if not self.enabled:
            return
        self.records.append(record)
        if self.config.logging.jsonl and self._local:
            with storage.faults_named(self.metrics_url), open(storage.filesystem(self.metrics_url)[1], "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        elif self.config.logging.jsonl:
            self._unflushed += 1
            if time.monotonic() - self._flushed_at >= self.config.logging.flush_every_s:
                self.flush_metrics()
        # W&B keeps the end in its summary; a checkpoint's record comes once it is committed,
        # after later steps, and W&B drops what is logged for an earlier step than its last.
        if self._wandb_run is not None and record["kind"] in ("train", "eval"):
            prefix = record["kind"]
            values = {f"{prefix}/{k}": v for k, v in record.items() if k not in ("kind", "step") and v is not None}
            self._wandb_run.log(values, step=record["step"])
        if record["kind"] != "checkpoint":  # the checkpointer says so as the commit happens
            log.info(format_record(record))

    def flush_metrics(self) -> None:
        """Make every record logged so far durable: on an object store, rewrite metrics.jsonl
        (local records are durable as they are logged)."""
        if not self.enabled or not self._unflushed:
            return
        with storage.faults_named(self.metrics_url):
            storage.write_bytes_atomic(self.metrics_url, _jsonl(self.records))
        self._unflushed, self._flushed_at = 0, time.monotonic()

    def flush(self) -> None:
        """Write what the evaluations add up to: metrics.jsonl, and the loss plot."""
        if not self.enabled:
            return
        self.flush_metrics()
        if self.config.logging.plot:
            plot_url = storage.join(self.run_dir, PLOT_FILE)
            with storage.faults_named(plot_url):
                write_loss_plot(self.records, plot_url, title=self.run_dir)

    def finish(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.flush()
        if self._wandb_run is not None:
            self._wandb_run.summary.update({k: v for k, v in summary.items() if v is not None})
            self._wandb_run.finish()


def format_record(record: dict[str, Any]) -> str:
    """A console line for a metrics record."""
    if record["kind"] == "end":
        return f"run {record['status']} at step {record['step']}"
    if record["kind"] == "eval":
        line = f"eval step {record['step']:>6} | val loss {record['val_loss']:.4f} | val ppl {record['val_ppl']:.2f}"
        if record.get("sample") is not None:
            line += f"\n  sample: {record['sample']!r}"
        return line
    mfu = "n/a" if record["mfu"] is None else f"{100 * record['mfu']:.1f}%"
    return (
        f"step {record['step']:>6} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
        f"grad norm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s | "
        f"tokens {record['tokens_seen']:,} | mfu {mfu} | mem {record['peak_memory_gib']:.2f} GiB"
    )


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """RUN_DIR/metrics.jsonl's records ([] before there are any); a line cut short by a kill
    is skipped."""
    url = storage.join(run_dir, METRICS_FILE)
    if not storage.exists(url):
        return []
    records = []
    for line in storage.read_bytes(url).decode(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(record) + "\n" for record in records).encode()


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709


def _import_wandb():
    try:
        import wandb
    except ImportError as err:
        raise GptrainError(
            "logging.wandb=true but the wandb package is not installed: pip install 'gptrain[wandb]' "
            "(or set logging.wandb=false)"
        ) from err
    return wandb


def _start_wandb(wandb, config: RunConfig, run_id: str | None):
    """A new W&B run, or with `run_id` (from the checkpoint) the same run continued."""
    settings = config.logging
    # W&B keeps its files (offline runs included) in the run directory when that is local.
    local_dir = config.train.run_dir if storage.is_local(config.train.run_dir) else None
    return wandb.init(
        project=settings.wandb_project,
        name=settings.wandb_run_name,
        tags=settings.wandb_tags,
        config=config.to_dict(),
        dir=local_dir,
        id=run_id,
        resume="allow" if run_id else None,
    )
