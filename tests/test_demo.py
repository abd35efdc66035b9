"""`make demo`'s own check (scripts/demo_check.py), on a real run of the demo preset: what
counts as a word and a newline run, and the exit status on a failed and a passed check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO, VENV_BIN
from train_fixtures import gutenberg_dataset  # noqa: F401 (a fixture)

sys.path.insert(0, str(REPO / "scripts"))
import demo_check  # noqa: E402

CHECK = REPO / "scripts" / "demo_check.py"


def run_check(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "python"), str(CHECK), str(run_dir)], capture_output=True, text=True)


def test_words_and_newline_runs():
    assert demo_check.alphabetic_words("“Alice,” said the Hatter. 1844 -- x7y don't") == 4
    assert demo_check.longest_newline_run("one\n\ntwo\n\n\n\nthree\n") == 4
    assert demo_check.longest_newline_run("no newline") == 0


def test_the_check_reads_a_demo_run_and_fails_or_passes(tmp_path, gutenberg_dataset):  # noqa: F811
    run_dir = tmp_path / "run"
    subprocess.run(
        [str(VENV_BIN / "gptrain"), "train", "--config", "demo", f"data.path={gutenberg_dataset}",
         f"train.run_dir={run_dir}", "train.max_steps=4", "schedule.warmup_steps=1", "eval.every=4",
         "eval.max_windows=4", "eval.sample_max_new_tokens=8", "checkpoint.every=100", "logging.plot=false"],
        check=True, capture_output=True,
    )
    # Four steps learn nothing: the loss stays near ln(50257) = 10.8, and the check says so.
    failed = run_check(run_dir)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "FAILED" in failed.stdout and "final validation loss 10." in failed.stdout, failed.stdout

    # The same run with a final evaluation that meets the bar: the prompt's own words do not count.
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    last_eval = max(i for i, r in enumerate(records) if r["kind"] == "eval")
    records[last_eval] |= {"val_loss": 5.5, "sample": "Every effort moves you, and the old man said to me that it was\n\n\nnot"}
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    passed = run_check(run_dir)
    assert passed.returncode == 0, passed.stdout
    assert passed.stdout.startswith("demo check: validation loss 10.") and "-> 5.500" in passed.stdout
    assert "11 alphabetic words and at most 3 newlines in a row: ok" in passed.stdout

    records[last_eval] |= {"sample": "Every effort moves you\n\n\n\n\n\nthe the"}
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    repeats = run_check(run_dir)
    assert repeats.returncode == 1
    assert "2 alphabetic words in the sample (want >= 10); a run of 6 newlines" in repeats.stdout, repeats.stdout
