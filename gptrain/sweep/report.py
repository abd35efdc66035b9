"""`gptrain sweep report SWEEP_DIR`: every trial's values and results, plots, the best config.

Reads trials.json and each trial's trial.json and metrics.jsonl (whatever state the sweep is
in) and writes into the sweep folder:

    report.csv                  one row per trial, in plan order
    report.md                   the same table ranked by final validation loss, and the best trial
    val_loss_vs_<KEY>.png       final validation loss of the done trials against each varied key
    top_trials_loss.png         validation (and training) loss curves of the best trials
    best_config.yaml            the best done trial's full config, for `gptrain train --config`

Status: done, failed, running-or-preempted (an attempt is under way, was stopped at a
checkpoint, or was killed), not started. "Best" means the lowest final validation loss among
the done trials (diverged ones, with a NaN or infinite loss, are listed but not ranked).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from dataclasses import dataclass
from typing import Any

from gptrain import storage
from gptrain.config import flatten
from gptrain.sweep.plan import SweepPlan, Trial, load_plan
from gptrain.sweep.run import read_trial_record
from gptrain.sweep.spec import EPOCHS_KEY
from gptrain.train.logger import read_metrics

BEST_CONFIG_FILE = "best_config.yaml"
STATUSES = ("done", "failed", "running-or-preempted", "not started")


@dataclass
class TrialResult:
    trial: Trial
    status: str
    values: dict[str, Any]  # every varied key: the trial's value, or the base config's
    evals: list[dict[str, Any]]  # eval records of metrics.jsonl, one per step
    train: list[dict[str, Any]]  # train records, one per step
    time_s: float | None  # wall-clock seconds of its finished attempts

    @property
    def final_val_loss(self) -> float | None:
        return self.evals[-1]["val_loss"] if self.evals else None

    @property
    def best_val_loss(self) -> float | None:
        return min(r["val_loss"] for r in self.evals) if self.evals else None

    @property
    def steps(self) -> int | None:
        return self.train[-1]["step"] if self.train else None

    @property
    def tokens_seen(self) -> int | None:
        return self.train[-1]["tokens_seen"] if self.train else None


@dataclass
class SweepReport:
    plan: SweepPlan
    results: list[TrialResult]  # plan order
    ranked: list[TrialResult]  # done trials, best first
    files: list[str]  # what was written into the sweep folder

    @property
    def best(self) -> TrialResult | None:
        return self.ranked[0] if self.ranked else None


def collect_results(plan: SweepPlan) -> list[TrialResult]:
    base = flatten(plan.base_config)
    results = []
    for trial in plan.trials:
        record = read_trial_record(plan, trial)
        records = read_metrics(plan.trial_url(trial))
        if record is not None:
            status = record["status"] if record["status"] in ("done", "failed") else "running-or-preempted"
            ended = [a["ended_at"] - a["started_at"] for a in record["attempts"] if a["ended_at"] is not None]
            time_s = sum(ended) if ended else None
        else:
            status, time_s = ("running-or-preempted" if records else "not started"), None
        values = {key: trial.params.get(key, None if key == EPOCHS_KEY else base.get(key)) for key in plan.params}
        results.append(TrialResult(trial, status, values, _last_per_step(records, "eval"),
                                   _last_per_step(records, "train"), time_s))
    return results


def _last_per_step(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """One record per step, the latest logged: a resumed run repeats the steps after its checkpoint."""
    by_step = {r["step"]: r for r in records if r.get("kind") == kind}
    return [by_step[step] for step in sorted(by_step)]


def write_report(sweep_dir: str, top: int = 5) -> SweepReport:
    plan = load_plan(sweep_dir)
    results = collect_results(plan)
    # A diverged trial (NaN or inf loss) is listed but not ranked.
    ranked = sorted((r for r in results if r.status == "done" and math.isfinite(r.final_val_loss or math.nan)),
                    key=lambda r: (r.final_val_loss, r.trial.index))
    report = SweepReport(plan, results, ranked, [])

    def put(name: str, data: bytes) -> None:
        storage.write_bytes_atomic(storage.join(sweep_dir, name), data)
        report.files.append(name)

    put("report.csv", _csv(report).encode())
    if ranked:
        for key in plan.params:
            put(f"val_loss_vs_{key}.png", _param_plot(ranked, key))
        put("top_trials_loss.png", _curves_plot(ranked[:top], plan.name))
        put(BEST_CONFIG_FILE, best_config_yaml(report).encode())
    put("report.md", markdown(report).encode())
    return report


# ---------------------------------------------------------------------------------------------
# Tables.

RESULT_COLUMNS = ("final_val_loss", "best_val_loss", "steps", "tokens_seen", "time_s", "run_dir")


def _row(result: TrialResult) -> list[Any]:
    r = result
    return [r.trial.index, r.trial.id, r.status, *r.values.values(),
            r.final_val_loss, r.best_val_loss, r.steps, r.tokens_seen, r.time_s, r.trial.folder]


def _csv(report: SweepReport) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["index", "id", "status", *report.plan.params, *RESULT_COLUMNS])
    for result in report.results:
        writer.writerow(["" if v is None else v for v in _row(result)])
    return out.getvalue()


def markdown(report: SweepReport) -> str:
    plan = report.plan
    counts = {s: sum(r.status == s for r in report.results) for s in STATUSES}
    lines = [
        f"# Sweep {plan.name}",
        "",
        f"{len(plan.trials)} trials ({', '.join(f'{n} {s}' for s, n in counts.items() if n)}); "
        f"base `{plan.spec['base']}`; {plan.summary}.",
        "",
    ]
    if report.best:
        best = report.best
        lines += [
            f"Best: trial {best.trial.index} (`{best.trial.id}`), final validation loss "
            f"{best.final_val_loss:.4f}: `{best.trial.describe()}`. "
            f"Train it: `gptrain train --config {storage.join(plan.sweep_dir, BEST_CONFIG_FILE)}`.",
            "",
        ]
    else:
        lines += ["No trial is done yet: no plots and no best config.", ""]
    header = ["rank", "trial", "id", "status", *plan.params, "final val loss", "best val loss", "steps",
              "tokens", "time (s)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rank = {id(r): i + 1 for i, r in enumerate(report.ranked)}
    unranked = [r for r in report.results if id(r) not in rank]
    for r in report.ranked + unranked:
        cells = [rank.get(id(r), "-"), r.trial.index, f"`{r.trial.id}`", r.status, *r.values.values(),
                 _number(r.final_val_loss, "{:.4f}"), _number(r.best_val_loss, "{:.4f}"), _number(r.steps, "{:,}"),
                 _number(r.tokens_seen, "{:,}"), _number(r.time_s, "{:.1f}")]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def _number(value: float | None, form: str) -> str:
    return "-" if value is None else form.format(value)


def best_config_yaml(report: SweepReport) -> str:
    """The best trial's full config, with its own run folder next to the trials."""
    best, plan = report.best, report.plan
    config = plan.trial_config(best.trial)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, run_dir=storage.join(plan.sweep_dir, "best")))
    return (
        f"# Best trial of sweep {plan.name}: trial {best.trial.index} ({best.trial.id}), "
        f"final validation loss {best.final_val_loss:.4f}\n"
        f"# {best.trial.describe()}\n"
        f"# gptrain train --config {storage.join(plan.sweep_dir, BEST_CONFIG_FILE)}\n"
        + config.to_yaml()
    )


# ---------------------------------------------------------------------------------------------
# Plots.


def _png(figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _param_plot(ranked: list[TrialResult], key: str) -> bytes:
    from matplotlib.figure import Figure  # not pyplot: no display or global state needed

    xs = [r.values[key] for r in ranked]
    ys = [r.final_val_loss for r in ranked]
    figure = Figure(figsize=(6, 4), dpi=100)
    axes = figure.add_subplot()
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    if not numeric:
        labels = sorted({str(x) for x in xs})
        xs = [labels.index(str(x)) for x in xs]
        axes.set_xticks(range(len(labels)), labels)
    else:
        if min(xs) > 0 and max(xs) / min(xs) >= 3:
            axes.set_xscale("log")  # learning rates and the like: factors matter, not differences
        ticks = sorted(set(xs))
        if len(ticks) <= 12:  # a grid's values: label exactly those
            axes.set_xticks(ticks, [f"{t:g}" for t in ticks])
            axes.minorticks_off()
    axes.scatter(xs, ys, alpha=0.7, label="done trials")
    axes.scatter(xs[:1], ys[:1], marker="*", s=250, facecolors="none", edgecolors="tab:red", linewidths=1.5,
                 label=f"best (trial {ranked[0].trial.index})")
    axes.set_xlabel(key)
    axes.set_ylabel("final validation loss")
    axes.set_title(f"validation loss vs {key} ({len(ranked)} done trials)", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _png(figure)


def _curves_plot(top: list[TrialResult], name: str) -> bytes:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=100)
    axes = figure.add_subplot()
    for i, result in enumerate(top):
        color = f"C{i % 10}"  # matplotlib's default cycle
        label = f"{result.trial.index} {result.trial.describe()}"
        axes.plot([r["tokens_seen"] for r in result.evals], [r["val_loss"] for r in result.evals], "o-",
                  color=color, linewidth=1.5, markersize=3, label=label)
        axes.plot([r["tokens_seen"] for r in result.train], [r["loss"] for r in result.train],
                  color=color, linewidth=0.8, alpha=0.35)
    axes.set_xlabel("tokens seen")
    axes.set_ylabel("loss (validation: markers; training: faint)")
    axes.set_title(f"sweep {name}: the {len(top)} best trials", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    return _png(figure)
