"""`gptrain status` on real runs (written by other processes, read by this one):

* a run in progress (another process training, with an offline W&B run), then the same run
  killed with SIGKILL in the middle of a checkpoint save;
* a sweep folder on the test S3 server with one finished trial and three not started, and
  the finished trial's s3:// run directory on its own.

The training process is tests/test_resume.py's worker: the real `gptrain train`, slowed per
step and per save so that the test can look while it runs and kill it inside a save.
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoint_fixtures import TINY_MODEL, prepare_dataset
from conftest import clean_env, stop_session
from gptrain.cli import main
from gptrain.status import sparkline

RESUME_WORKER = Path(__file__).with_name("test_resume.py")
STEPS = 12


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return prepare_dataset(tmp_path_factory.mktemp("status-data"))


def gptrain(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptrain", *args], capture_output=True, text=True, timeout=120,
                          env=clean_env(WANDB_MODE="offline", WANDB_SILENT="true"), cwd=cwd)


@pytest.fixture
def status(capsys):
    """`gptrain status TARGET [OPTIONS]` in this process: its output, parsed with --json."""

    def run(target: str, *options: str) -> dict | str:
        assert main(["status", target, *options]) == 0
        out = capsys.readouterr().out
        return json.loads(out) if "--json" in options else out

    return run


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the training process ended ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r["step"] for r in map(json.loads, [line for line in lines if line.endswith("}")]) if r["kind"] == "train"]


@pytest.mark.slow
def test_status_of_a_run_in_progress_and_after_a_kill_in_the_middle_of_a_save(tmp_path, dataset, status):
    run_dir = tmp_path / "run"
    config = tmp_path / "config.json"  # JSON is YAML
    config.write_text(json.dumps({
        "model": TINY_MODEL, "data": {"path": str(dataset)}, "optim": {"lr": 3e-3, "fused": False},
        "train": {"run_dir": str(run_dir), "max_steps": STEPS, "micro_batch_size": 2, "device": "cpu",
                  "log_every": 1},
        "eval": {"every": 3, "max_windows": 4, "sample_prompt": ""},
        "checkpoint": {"every": 3, "keep_last": 2},
        "logging": {"plot": False, "wandb": True, "wandb_project": "gptrain-test"},
    }))
    step_3, step_6 = run_dir / "checkpoints" / "step-3", run_dir / "checkpoints" / "step-6"
    # Each save waits 3 s after its shard is written, before the metadata and the commit marker.
    proc = subprocess.Popen(
        [sys.executable, str(RESUME_WORKER), "--step-delay", "0.1", "--save-delay", "3", "--",
         "train", "--config", str(config)],
        env=clean_env(WANDB_MODE="offline", WANDB_SILENT="true"), stdout=(tmp_path / "train.log").open("wb"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for(lambda: (step_3 / "commit.json").exists() and max(train_steps(run_dir), default=0) >= 4,
                 proc, "step 3 committed and step 4 logged")
        running = status(str(run_dir), "--json")
        text = status(str(run_dir))
        wait_for(lambda: any(step_6.glob("*.distcp")), proc, "step 6's shard")
        proc.send_signal(signal.SIGKILL)  # the process alone: its save of step 6 never commits
        proc.wait(timeout=30)
    finally:
        stop_session(proc)

    assert running["state"] == "running" and 4 <= running["step"] < STEPS and running["total_steps"] == STEPS
    assert running["tokens_seen"] == running["step"] * 2 * 32 and running["tokens_per_s"] > 0
    assert running["eta_s"] > 0 and running["seconds_since_update"] < running["stalled_after_s"]
    assert math.isfinite(running["train_loss"]) and running["val_step"] in (3, 6)
    assert running["newest_usable_step"] == 3
    (wandb_folder,) = (run_dir / "wandb").glob("offline-run-*")
    (wandb_file,) = wandb_folder.glob("run-*.wandb")  # W&B's own record of the run id
    assert running["wandb_run_id"] == wandb_file.stem.removeprefix("run-")
    assert re.search(rf"^{re.escape(str(run_dir))}: running, step \d+/{STEPS} \(\d+%\)$", text, re.M)  # it moves on
    assert "ETA" in text and "step-3 " in text and "newest usable" in text and running["wandb_run_id"] in text
    assert any(level in text for level in "▁▂▃▄▅▆▇█")

    # Killed in the middle of the save of step 6: once nothing new arrives, the run is stalled,
    # step 6 is uncommitted (its shard is there) and step 3 is what a rerun resumes from.
    killed = status(str(run_dir), "--json", "--stalled-after", "0")
    assert killed["state"] == "stalled" and killed["eta_s"] is None
    by_step = {c["step"]: c for c in killed["checkpoints"]}
    assert not by_step[6]["committed"] and by_step[6]["size_bytes"] > 0
    assert by_step[3]["committed"] and by_step[3]["usable"] and killed["newest_usable_step"] == 3
    text = status(str(run_dir), "--stalled-after", "0")
    assert f"{run_dir}: stalled, step {killed['step']}/{STEPS}" in text and "killed or hung?" in text
    assert "step-6" in text and "uncommitted" in text


@pytest.mark.slow
def test_status_of_a_sweep_folder_and_a_finished_run_on_s3(tmp_path, dataset, s3_bucket, status):
    sweep_dir = f"{s3_bucket}/sweeps/debug-4"
    # The shipped 4-trial debug sweep on the tiny model; trial 0 trains (W&B offline writes into
    # this test's folder: an s3:// run directory has no local folder for it).
    tiny = [f"model.{key}={value}" for key, value in TINY_MODEL.items() if key not in ("name", "dropout")]
    trained = gptrain("sweep", "run", "debug-4", "--index", "0", "--sweep-dir", sweep_dir, f"data.path={dataset}",
                      *tiny, "train.max_steps=6", "checkpoint.every=3", "eval.every=3", "train.log_every=1",
                      "logging.wandb=true", "logging.wandb_project=gptrain-test", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr

    sweep = status(sweep_dir, "--json")
    assert sweep["sweep_dir"] == sweep_dir and sweep["name"] == "debug-4"
    states = [(t["index"], t["trial_status"], t["state"]) for t in sweep["trials"]]
    assert states == [(0, "done", "finished"), (1, "not started", "not started"),
                      (2, "not started", "not started"), (3, "not started", "not started")]
    text = status(sweep_dir)
    lines = text.splitlines()
    assert lines[0] == f"{sweep_dir}: sweep 'debug-4', 4 trials (1 finished, 3 not started)"
    assert len(lines) == 5 and "finished" in lines[1] and "step 6/6 (100%)" in lines[1] and "ckpt step-6" in lines[1]

    # The finished trial's run directory on its own.
    trial_dir = sweep["trials"][0]["run_dir"]
    finished = status(trial_dir, "--json")
    assert trial_dir.startswith(f"{sweep_dir}/trials/0-")
    assert finished["state"] == "finished" and finished["step"] == finished["total_steps"] == 6
    assert finished["eta_s"] is None and finished["val_step"] == 6
    assert [(c["step"], c["committed"], c["usable"]) for c in finished["checkpoints"]] == [(6, True, True), (3, True, False)]
    assert all(c["size_bytes"] > 0 for c in finished["checkpoints"])
    (wandb_folder,) = (tmp_path / "wandb").glob(f"offline-run-*-{finished['wandb_run_id']}")
    text = status(trial_dir)
    assert f"{trial_dir}: finished, step 6/6 (100%)" in text and finished["wandb_run_id"] in text
    assert "ETA" not in text and "newest usable" in text
    assert finished["last_save"]["step"] == 6 and finished["last_save"]["async"] is False
    assert re.search(r"last save +step 6, sync: training stalled [\d.]+ s\n", text)


def test_missing_and_foreign_folders_are_named(tmp_path):
    missing = gptrain("status", str(tmp_path / "nope"))
    assert missing.returncode == 2 and f"{tmp_path / 'nope'}: no such run directory" in missing.stderr
    foreign = gptrain("status", str(tmp_path))
    assert foreign.returncode == 2 and "not a gptrain run directory" in foreign.stderr


def test_sparkline_scales_buckets_and_marks_divergence():
    assert sparkline([]) == ""
    assert sparkline([3.0, 2.0, 1.0]) == "█▅▁"
    line = sparkline([10.0 - i / 100 for i in range(1000)], width=40)
    assert len(line) == 40 and line[0] == "█" and line[-1] == "▁"
    assert sparkline([1.0, 1.0]) == "▁▁" and sparkline([2.0, float("nan")]) == "▁!"
