"""Hyperparameter sweeps: spec parsing, stable numbering and ids, errors before any trial
starts, and the 4-trial debug sweep end to end on real books (run, skip on rerun, resume
after a kill, report)."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gptrain.cli import main as gptrain_main
from gptrain.config import load_config
from gptrain.errors import EXIT_PREEMPTED, GptrainError
from gptrain.sweep.plan import load_plan, make_plan, open_sweep
from gptrain.sweep.spec import load_spec, parse_spec
from train_fixtures import gutenberg_dataset  # noqa: F401 (a fixture)

GPTRAIN = str(Path(sys.executable).parent / "gptrain")


def _spec(tmp_path: Path, text: str, *overrides: str, name: str = "spec.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return load_spec(str(path), overrides, sweep_dir=str(tmp_path / "sweep"))


MIXED = """
base: debug
grid:
  optim.lr: [1e-3, 3e-3]
  train.micro_batch_size: [2, 4]
lists:
  schedule.warmup_steps: [5, 10]
  schedule.initial_lr: [1e-4, 2e-4]
random:
  samples: 3
  seed: 7
  params:
    optim.weight_decay: {uniform: [0.0, 0.1]}
    model.dropout: {choice: [0.0, 0.1, 0.2]}
    eval.max_windows: {log_uniform: [4, 64]}
repeats: 2
"""


# ---------------------------------------------------------------------------------------------
# Specs and plans (no training).


def test_grid_lists_random_and_repeats_are_numbered_grid_first(tmp_path):
    plan = make_plan(_spec(tmp_path, MIXED))
    # 2 x 2 grid x 2 zipped lists = 8 points, then 3 random samples; each with 2 seeds.
    assert len(plan.trials) == (8 + 3) * 2
    assert [t.index for t in plan.trials] == list(range(22))
    first, second = plan.trials[0].params, plan.trials[1].params
    assert first == {"optim.lr": 0.001, "train.micro_batch_size": 2, "schedule.warmup_steps": 5,
                     "schedule.initial_lr": 0.0001, "train.seed": 123}
    assert second == {**first, "train.seed": 124}  # repeats: the base seed + 0, 1
    # The last axis (the zipped lists) varies fastest; its keys move together.
    assert plan.trials[2].params["schedule.warmup_steps"] == 10 and plan.trials[2].params["schedule.initial_lr"] == 2e-4
    assert plan.trials[4].params["train.micro_batch_size"] == 4
    assert plan.trials[8].params["optim.lr"] == 0.003
    randoms = [t.params for t in plan.trials[16::2]]
    for params in randoms:
        assert set(params) == {"optim.weight_decay", "model.dropout", "eval.max_windows", "train.seed"}
        assert 0.0 <= params["optim.weight_decay"] <= 0.1
        assert len(f"{params['optim.weight_decay']:g}".lstrip("0.")) <= 4  # 4 significant digits
        assert params["model.dropout"] in (0.0, 0.1, 0.2)
        assert isinstance(params["eval.max_windows"], int) and 4 <= params["eval.max_windows"] <= 64
    assert plan.params == ["optim.lr", "train.micro_batch_size", "schedule.warmup_steps", "schedule.initial_lr",
                           "optim.weight_decay", "model.dropout", "eval.max_windows", "train.seed"]
    config = plan.trial_config(plan.trials[5])
    assert config.optim.lr == 0.001 and config.train.micro_batch_size == 4 and config.train.seed == 124
    assert config.train.run_dir == str(tmp_path / "sweep" / "trials" / f"5-{plan.trials[5].id}")


def test_ids_and_numbering_are_stable_across_replans_and_specs(tmp_path):
    plan = make_plan(_spec(tmp_path, MIXED))
    again = make_plan(_spec(tmp_path, MIXED))
    assert [(t.index, t.id, t.params) for t in plan.trials] == [(t.index, t.id, t.params) for t in again.trials]
    assert len({t.id for t in plan.trials}) == len(plan.trials)
    # More random samples keep the earlier ones (sample j depends only on the seed and j).
    more = make_plan(_spec(tmp_path, MIXED.replace("samples: 3", "samples: 5")))
    assert [t.id for t in more.trials[:22]] == [t.id for t in plan.trials]
    # An id names the values, not the position: another axis order gives the same ids.
    swapped = make_plan(_spec(tmp_path, "base: debug\ngrid:\n  optim.weight_decay: [0.0, 0.1]\n  optim.lr: [1e-3, 2e-3]\n"))
    straight = make_plan(_spec(tmp_path, "base: debug\ngrid:\n  optim.lr: [1e-3, 2e-3]\n  optim.weight_decay: [0.0, 0.1]\n"))
    assert {t.id for t in swapped.trials} == {t.id for t in straight.trials}
    # The same spec as a file and as a string of override values: 1e-3 and 0.001 are one value.
    assert straight.trials[0].params == {"optim.lr": 0.001, "optim.weight_decay": 0.0}


def test_budget_keeps_the_first_or_a_seeded_random_subset_in_plan_order(tmp_path):
    grid = "base: debug\ngrid:\n  optim.lr: [1e-3, 2e-3, 3e-3, 4e-3]\n  model.dropout: [0.0, 0.1, 0.2]\nrepeats: {seeds: [1, 2]}\n"
    full = make_plan(_spec(tmp_path, grid))
    assert len(full.trials) == 24
    first = make_plan(_spec(tmp_path, grid + "budget: 6\n"))
    assert [t.id for t in first.trials] == [t.id for t in full.trials[:6]]  # 3 configurations x 2 seeds
    subset = grid + "budget: {trials: 8, select: random, seed: 3}\n"
    chosen = make_plan(_spec(tmp_path, subset))
    assert len(chosen.trials) == 8 and [t.index for t in chosen.trials] == list(range(8))
    full_order = [t.id for t in full.trials]
    positions = [full_order.index(t.id) for t in chosen.trials]
    assert positions == sorted(positions) and positions != list(range(8))
    assert [t.id for t in make_plan(_spec(tmp_path, subset)).trials] == [t.id for t in chosen.trials]
    assert "a random 4 of 12 configurations (seed 3)" in chosen.summary


def test_epochs_become_a_token_budget(tmp_path):
    plan = make_plan(_spec(tmp_path, "base: debug\nepoch_tokens: 1000\ngrid:\n  epochs: [2, 5]\n"))
    config = plan.trial_config(plan.trials[1])
    assert plan.trials[1].params == {"epochs": 5}
    assert config.train.max_tokens == 5000 and config.train.max_steps is None


def test_reference_grid_ships_with_the_books_grid_and_a_budget(gutenberg_dataset):  # noqa: F811
    spec = load_spec("reference-grid", [f"data.path={gutenberg_dataset}"])
    assert [len(values) for values in spec.grid.values()] == [4, 3, 3, 3, 4, 2, 3, 5]
    plan = make_plan(spec)
    assert "12960 point(s)" in plan.summary and len(plan.trials) == 40
    train_tokens = json.loads((Path(gutenberg_dataset) / "manifest.json").read_text())["splits"]["train"]["tokens"]
    trial = plan.trials[0]
    config = plan.trial_config(trial)
    assert plan.epoch_tokens == train_tokens
    assert config.train.max_tokens == trial.params["epochs"] * train_tokens
    assert config.model.context_length == 256 and config.train.micro_batch_size == trial.params["train.micro_batch_size"]


@pytest.mark.parametrize("text, message", [
    ("base: debug\ngrid:\n  optim.lrr: [1e-3]\n", "unknown config key 'optim.lrr'; valid in optim: lr, weight_decay"),
    ("base: debug\ngrid:\n  optimizer.lr: [1e-3]\n", "unknown config key 'optimizer.lr'; valid sections: model"),
    ("base: debug\ngrid:\n  optim.lr.peak: [1e-3]\n", "unknown config key 'optim.lr.peak': optim.lr has no sub-keys"),
    ("base: debug\ngrid:\n  optim.lr: []\n", "grid axis 'optim.lr' is empty"),
    ("base: debug\nlists:\n  optim.lr: [1e-3, 2e-3]\n  model.dropout: [0.1]\n", "need equal lengths"),
    ("base: debug\nrandom:\n  samples: 2\n  params:\n    optim.lr: {normal: [0, 1]}\n", "random.params.optim.lr"),
    ("base: debug\nrandom:\n  samples: 2\n  params:\n    optim.lr: {log_uniform: [0, 1]}\n", "LOW must be > 0"),
    ("base: debug\nrandom:\n  samples: 2\n  params:\n    optim.lr: {uniform: [0.1, 0.01]}\n", "LOW < HIGH"),
    ("base: debug\nrandom:\n  samples: 2\n  params:\n    model.dropout: {choice: []}\n", "choice is empty"),
    ("base: debug\ngrid:\n  optim.lr: [-1]\n", "trial 0 (optim.lr=-1): optim.lr=-1.0: must be > 0"),
    ("base: debug\ngrid:\n  optim.lr: [1e-3]\nrandom:\n  samples: 1\n  params:\n    optim.lr: {choice: [1]}\n",
     "'optim.lr' is varied by both grid and random.params"),
    ("base: debug\ngrid:\n  epochs: [1]\n", "needs epoch_tokens"),
    ("base: debug\nepoch_tokens: 100\ngrid:\n  epochs: [two]\n", "trial 0 (epochs=two): epochs='two': expected a number"),
    ("base: debug\ngrid:\n  train.run_dir: [a]\n", "train.run_dir is set per trial"),
    ("base: debug\nrepeats: 2\ngrid:\n  train.seed: [1]\n", "'train.seed' is varied by grid and by repeats"),
    ("base: debug\nbudget: {trials: 1}\nrepeats: 2\n", "below one configuration's 2 repeats"),
    ("base: debug\ngrid:\n  optim.lr: [1e-3, 0.001]\n", "trials 0 and 1 are the same (optim.lr=0.001)"),
    ("base: debug\ngird:\n  optim.lr: [1]\n", "unknown spec key 'gird'"),
    ("base: nosuchpreset\n", "base 'nosuchpreset'"),
])
def test_bad_specs_fail_naming_the_culprit(tmp_path, text, message):
    with pytest.raises(GptrainError) as caught:
        make_plan(_spec(tmp_path, text))
    assert message in str(caught.value)
    assert str(tmp_path / "spec.yaml") in str(caught.value)


def test_a_bad_spec_stops_the_cli_before_any_trial_starts(tmp_path, capsys):
    spec = tmp_path / "typo.yaml"
    spec.write_text("base: debug\ngrid:\n  optim.lr: [1e-3]\n  model.dropuot: [0.1]\n")
    sweep_dir = tmp_path / "sweep"
    assert gptrain_main(["sweep", "run", str(spec), "--index", "0", "--sweep-dir", str(sweep_dir)]) == 2
    assert "unknown config key 'model.dropuot'" in capsys.readouterr().err
    assert not sweep_dir.exists()
    spec.write_text("base: debug\ngrid:\n  optim.lr: []\n")
    assert gptrain_main(["sweep", "plan", str(spec)]) == 2
    assert "grid axis 'optim.lr' is empty" in capsys.readouterr().err


def test_a_sweep_folder_refuses_a_differently_planned_sweep(tmp_path):
    text = "base: debug\ngrid:\n  optim.lr: [1e-3, 2e-3]\n"
    plan = open_sweep(_spec(tmp_path, text, "data.path=/data/a"))
    stored = json.loads((tmp_path / "sweep" / "trials.json").read_text())
    assert [t["run_dir"] for t in stored["trials"]] == [f"trials/{t.index}-{t.id}" for t in plan.trials]
    assert yaml.safe_load((tmp_path / "sweep" / "spec.yaml").read_text())["overrides"] == {"data.path": "/data/a"}
    assert load_plan(str(tmp_path / "sweep")).trials == plan.trials
    assert open_sweep(_spec(tmp_path, text, "data.path=/data/a")).trials == plan.trials
    with pytest.raises(GptrainError, match=r"base_config.data.path: '/data/a' there, '/data/b' now"):
        open_sweep(_spec(tmp_path, text, "data.path=/data/b"))
    with pytest.raises(GptrainError, match=r"spec.grid.optim.lr"):
        open_sweep(_spec(tmp_path, text.replace("2e-3", "3e-3"), "data.path=/data/a"))


def test_spec_as_written_round_trips(tmp_path):
    spec = _spec(tmp_path, MIXED, "data.path=/data/x")
    written = yaml.safe_dump(spec.to_dict(), sort_keys=False)  # as spec.yaml is written
    again = parse_spec(yaml.safe_load(written), "copy", "x", sweep_dir=spec.sweep_dir)
    assert again.to_dict() == spec.to_dict()
    assert [t.id for t in make_plan(again).trials] == [t.id for t in make_plan(spec).trials]


# ---------------------------------------------------------------------------------------------
# The 4-trial debug sweep on real books, through the CLI.

STEPS, EVAL_EVERY, CHECKPOINT_EVERY, BATCH = 20, 10, 10, 2  # gptrain/sweeps/debug-4.yaml


def _run(sweep_dir: Path, dataset: str, *args: str) -> list[str]:
    return ["sweep", "run", "debug-4", *args, "--sweep-dir", str(sweep_dir), f"data.path={dataset}"]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _final(run_dir: Path, kind: str, field: str) -> dict[int, float]:
    """{step: value} of the records of one kind, the last logged per step (a resume repeats some)."""
    return {r["step"]: r[field] for r in _records(run_dir) if r["kind"] == kind}


def _trial_dirs(sweep_dir: Path) -> list[Path]:
    plan = load_plan(str(sweep_dir))
    return [sweep_dir / trial.folder for trial in plan.trials]


@pytest.fixture(scope="module")
def debug_sweep(tmp_path_factory, gutenberg_dataset):  # noqa: F811
    """The debug-4 sweep, every trial run once with `gptrain sweep run --index I`."""
    sweep_dir = tmp_path_factory.mktemp("sweep") / "debug-4"
    for index in range(4):
        assert gptrain_main(_run(sweep_dir, gutenberg_dataset, "--index", str(index))) == 0
    return sweep_dir


@pytest.mark.slow
def test_debug_sweep_trains_each_trial_in_its_own_folder(debug_sweep):
    plan = load_plan(str(debug_sweep))
    assert (debug_sweep / "spec.yaml").exists()
    assert [t.params for t in plan.trials] == [
        {"optim.lr": lr, "model.dropout": dropout} for lr in (0.001, 0.003) for dropout in (0.0, 0.1)
    ]
    for trial, run_dir in zip(plan.trials, _trial_dirs(debug_sweep)):
        record = json.loads((run_dir / "trial.json").read_text())
        assert record["status"] == "done" and len(record["attempts"]) == 1 and record["id"] == trial.id
        config = load_config(str(run_dir / "config.yaml"))
        assert (config.optim.lr, config.model.dropout) == (trial.params["optim.lr"], trial.params["model.dropout"])
        assert config.train.run_dir == str(run_dir)
        evals = _final(run_dir, "eval", "val_loss")
        assert list(evals) == list(range(0, STEPS + 1, EVAL_EVERY))
        assert evals[STEPS] < evals[0] - 0.5  # it learned
        assert record["summary"]["val_loss"] == evals[STEPS]


@pytest.mark.slow
def test_report_tables_plots_and_best_config(debug_sweep, capsys):
    assert gptrain_main(["sweep", "report", str(debug_sweep)]) == 0
    printed = capsys.readouterr().out
    finals = [_final(run_dir, "eval", "val_loss")[STEPS] for run_dir in _trial_dirs(debug_sweep)]
    best = min(range(4), key=finals.__getitem__)

    with open(debug_sweep / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == [0, 1, 2, 3]
    assert {r["status"] for r in rows} == {"done"}
    assert [float(r["final_val_loss"]) for r in rows] == finals
    assert all(float(r["best_val_loss"]) <= float(r["final_val_loss"]) for r in rows)
    assert all(int(r["tokens_seen"]) == STEPS * BATCH * 64 and float(r["time_s"]) > 0 for r in rows)
    assert [float(r["optim.lr"]) for r in rows] == [0.001, 0.001, 0.003, 0.003]

    markdown = (debug_sweep / "report.md").read_text()
    assert markdown in printed
    table = [line for line in markdown.splitlines() if line.startswith("| ") and "done" in line]
    assert len(table) == 4 and table[0].startswith(f"| 1 | {best} |")  # ranked by final validation loss
    assert f"Best: trial {best}" in markdown

    for name in ("val_loss_vs_optim.lr.png", "val_loss_vs_model.dropout.png", "top_trials_loss.png"):
        png = (debug_sweep / name).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000, name

    config = load_config(str(debug_sweep / "best_config.yaml"))
    best_trial = load_plan(str(debug_sweep)).trials[best]
    assert (config.optim.lr, config.model.dropout) == tuple(best_trial.params.values())
    assert config.train.run_dir == str(debug_sweep / "best") and config.train.max_steps == STEPS


@pytest.mark.slow
def test_rerun_skips_all_four_done_trials(debug_sweep, gutenberg_dataset, caplog):  # noqa: F811
    def snapshot():
        return [{name: ((run_dir / name).read_bytes(), (run_dir / name).stat().st_mtime_ns)
                 for name in ("metrics.jsonl", "trial.json", "config.yaml")} for run_dir in _trial_dirs(debug_sweep)]

    before = snapshot()
    caplog.set_level("INFO", logger="gptrain")
    for index in range(4):
        assert gptrain_main(_run(debug_sweep, gutenberg_dataset, "--index", str(index))) == 0
    assert gptrain_main(_run(debug_sweep, gutenberg_dataset, "--all")) == 0
    assert snapshot() == before  # no training happened: nothing in the trial folders was touched
    skipped = [r.getMessage() for r in caplog.records if "is done already" in r.getMessage()]
    assert len(skipped) == 8 and all("skipping" in message for message in skipped)


def test_a_failing_trial_is_recorded_and_reported_as_failed(tmp_path, capsys):
    spec = tmp_path / "one.yaml"
    spec.write_text("base: debug\ngrid:\n  optim.lr: [1e-3]\n")
    sweep_dir = tmp_path / "sweep"
    missing = tmp_path / "no-such-dataset"
    assert gptrain_main(["sweep", "run", str(spec), "--sweep-dir", str(sweep_dir), f"data.path={missing}"]) == 2
    assert "no dataset manifest" in capsys.readouterr().err
    (run_dir,) = _trial_dirs(sweep_dir)
    record = json.loads((run_dir / "trial.json").read_text())
    assert record["status"] == "failed" and "no dataset manifest" in record["error"]
    assert [a["outcome"] for a in record["attempts"]] == ["failed"]
    assert gptrain_main(["sweep", "report", str(sweep_dir)]) == 0
    assert "No trial is done yet" in (sweep_dir / "report.md").read_text()
    with open(sweep_dir / "report.csv") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["failed"]
    assert not (sweep_dir / "best_config.yaml").exists()


@pytest.mark.slow
def test_killed_and_preempted_trials_resume_to_the_uninterrupted_losses(debug_sweep, gutenberg_dataset, tmp_path):  # noqa: F811
    """Two trials of a second sweep folder run at once, as array tasks would. After each has
    committed its step-10 checkpoint, trial 3 gets SIGKILL (no warning, no save) and trial 2
    SIGTERM (preemption: save at the next step, exit 75). Rerun, each resumes and ends exactly
    where the uninterrupted trial of the debug sweep ended (trial 3 has dropout on, so
    resuming must restore the RNG streams too)."""
    sweep_dir = tmp_path / "debug-4"
    plan = make_plan(load_spec("debug-4", [f"data.path={gutenberg_dataset}"], str(sweep_dir)))
    signals = {3: signal.SIGKILL, 2: signal.SIGTERM}
    procs, logs = {}, {}
    try:
        for index in signals:
            logs[index] = open(tmp_path / f"trial-{index}.log", "wb")
            procs[index] = subprocess.Popen([GPTRAIN, *_run(sweep_dir, gutenberg_dataset, "--index", str(index))],
                                            stdout=logs[index], stderr=subprocess.STDOUT)
        # Each trial gets its signal as soon as its own step-10 checkpoint is committed: waiting
        # for one trial first would let the other run on, up to its last step.
        markers = {index: sweep_dir / plan.trials[index].folder / "checkpoints" / f"step-{CHECKPOINT_EVERY}"
                   / "commit.json" for index in signals}
        deadline = time.monotonic() + 240
        while markers and time.monotonic() < deadline:
            for index, marker in list(markers.items()):
                if marker.exists():
                    procs[index].send_signal(signals[index])
                    del markers[index]
                else:
                    assert procs[index].poll() is None, (tmp_path / f"trial-{index}.log").read_text()[-3000:]
            time.sleep(0.05)
        assert not markers, {index: (tmp_path / f"trial-{index}.log").read_text()[-3000:] for index in markers}
        assert procs[3].wait(60) == -signal.SIGKILL
        assert procs[2].wait(60) == EXIT_PREEMPTED, (tmp_path / "trial-2.log").read_text()[-3000:]
    finally:
        for index, proc in procs.items():
            proc.kill()
            proc.wait()
            logs[index].close()

    run_dirs = {index: sweep_dir / plan.trials[index].folder for index in signals}
    for index, status in ((3, "running"), (2, "preempted")):
        assert json.loads((run_dirs[index] / "trial.json").read_text())["status"] == status
        assert max(_final(run_dirs[index], "train", "loss"), default=0) < STEPS  # stopped before the end
    assert gptrain_main(["sweep", "report", str(sweep_dir)]) == 0
    with open(sweep_dir / "report.csv") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["not started"] * 2 + ["running-or-preempted"] * 2

    for index in signals:
        assert gptrain_main(_run(sweep_dir, gutenberg_dataset, "--index", str(index))) == 0
        record = json.loads((run_dirs[index] / "trial.json").read_text())
        first_outcome = None if index == 3 else "preempted"
        assert record["status"] == "done" and [a["outcome"] for a in record["attempts"]] == [first_outcome, "done"]
        reference = _trial_dirs(debug_sweep)[index]
        assert _final(run_dirs[index], "eval", "val_loss") == _final(reference, "eval", "val_loss")
        assert _final(run_dirs[index], "train", "loss") == _final(reference, "train", "loss")


@pytest.mark.slow
def test_sweep_folder_on_object_storage(s3_bucket, gutenberg_dataset, tmp_path):  # noqa: F811
    import s3fs

    spec = tmp_path / "tiny.yaml"
    spec.write_text(
        "base: debug\n"
        "overrides: {train.max_steps: 4, schedule.warmup_steps: 2, eval.every: 2, eval.max_windows: 4,\n"
        "            eval.sample_prompt: '', checkpoint.every: 2}\n"
        "grid:\n  model.dropout: [0.1]\n"
    )
    sweep_dir = f"{s3_bucket}/sweeps/tiny"
    run = ["sweep", "run", str(spec), "--sweep-dir", sweep_dir, f"data.path={gutenberg_dataset}"]
    assert gptrain_main(run) == 0
    assert gptrain_main(["sweep", "report", sweep_dir]) == 0
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    rows = list(csv.DictReader(fs.cat(f"{sweep_dir}/report.csv").decode().splitlines()))
    assert [(r["status"], r["steps"]) for r in rows] == [("done", "4")]
    assert load_config(f"{sweep_dir}/best_config.yaml").train.run_dir == f"{sweep_dir}/best"
    trial_json = f"{sweep_dir}/{rows[0]['run_dir']}/trial.json"
    before = fs.cat(trial_json)
    assert gptrain_main(run) == 0  # done: skipped
    fs.invalidate_cache()
    assert fs.cat(trial_json) == before
