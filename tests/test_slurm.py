"""The project's Slurm scripts (slurm/) on a real Slurm cluster: slurmctld and two slurmd
emulating nodes n1 and n2 (tests/slurm_cluster.py).

slurm/submit.sh submits the preprocess job array (download + prepare, two tasks over six real
books), the finalize job that depends on it, and a pretraining job on both nodes (a torchrun
with two workers on each: world size 4) that depends on finalize. A second pretraining run of
the same config is warned with `scancel --signal=USR1` half way: it saves a checkpoint,
requeues itself, resumes, and ends with exactly the weights of the uninterrupted run.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from gptrain.checkpoint.export import load_model_from_checkpoint
from gptrain.sweep.report import write_report
from gptrain.train.logger import read_metrics
from slurm_cluster import REPO, SlurmCluster, slurm_cluster  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow

SLURM = REPO / "slurm"
# Three odd and three even book ids, so that each of the two array tasks gets books.
BOOKS = "11,35,41,46,74,1080"
STEPS = 16
# The debug preset (tiny GPT-2 on CPU), short: no evaluation until the end, no text sample,
# no plot; a checkpoint only at the end (and on preemption).
TRAIN_OVERRIDES = [
    f"train.max_steps={STEPS}", "schedule.warmup_steps=4", "train.log_every=1", "eval.every=0",
    "eval.max_windows=4", "eval.sample_prompt=", "logging.plot=false", "checkpoint.every=0",
]


def _train_env(cluster: SlurmCluster, work: Path, run_dir: Path, **extra: str) -> dict[str, str]:
    return cluster.env(
        GPTRAIN_DATASET=str(work / "dataset"), GPTRAIN_RUN_DIR=str(run_dir), GPTRAIN_CONFIG="debug",
        GPTRAIN_NPROC_PER_NODE="2", **extra,
    )


def _train_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(str(run_dir)) if r["kind"] == "train"]


def _completed(records: list[dict[str, str]]) -> None:
    for record in records:
        assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), record


@pytest.fixture(scope="module")
def pipeline(slurm_cluster: SlurmCluster, mirror_dir: Path, tmp_path_factory) -> dict:  # noqa: F811
    """`slurm/submit.sh preprocess pretrain` from a fresh directory, run to the end."""
    work = tmp_path_factory.mktemp("slurm-pipeline")
    env = _train_env(
        slurm_cluster, work, work / "run",
        GPTRAIN_MIRROR=str(mirror_dir),
        GPTRAIN_RAW=str(work / "raw"),
        GPTRAIN_DOWNLOAD_ARGS=f"--ids {BOOKS}",
        GPTRAIN_ARRAY_TASKS="2",
        GPTRAIN_SWEEP_SPEC="debug-4",  # 4 trials; submit.sh asks `gptrain sweep plan --count`
        GPTRAIN_SWEEP_DIR=str(work / "sweep"),
        GPTRAIN_SWEEP_PARALLEL="2",
        GPTRAIN_SBATCH_ARGS=f"--output={work}/%x-%j.out",
    )
    out = slurm_cluster.run(
        "bash", str(SLURM / "submit.sh"), "preprocess", "pretrain", "sweep", "--", *TRAIN_OVERRIDES, cwd=work, env=env
    )
    jobs = dict(line.split() for line in out.splitlines())
    assert set(jobs) == {"preprocess", "finalize", "pretrain", "sweep"}, out
    # Queued behind its dependency (unless the array was faster than this check).
    (finalize_record,) = slurm_cluster.jobs(jobs["finalize"])
    assert f"afterok:{jobs['preprocess']}" in finalize_record["Dependency"] or finalize_record["JobState"] != "PENDING"
    return {
        "work": work,
        "jobs": jobs,
        "array": slurm_cluster.wait(jobs["preprocess"], timeout=120),
        "finalize": slurm_cluster.wait(jobs["finalize"], timeout=60),
        "pretrain": slurm_cluster.wait(jobs["pretrain"], timeout=240),
        "sweep": slurm_cluster.wait(jobs["sweep"], timeout=240),
    }


def test_preprocess_array_then_finalize_builds_the_dataset(pipeline: dict) -> None:
    work = pipeline["work"]
    array, (finalize,) = pipeline["array"], pipeline["finalize"]
    assert sorted(r["ArrayTaskId"] for r in array) == ["0", "1"]
    _completed(array)
    _completed([finalize])
    assert finalize["StartTime"] >= max(r["EndTime"] for r in array)  # ISO times sort as text

    # Each task downloaded and tokenized its share of the books; finalize merged the two.
    for index in (0, 1):
        report = json.loads((work / "raw" / "reports" / f"download-{index}-of-2.json").read_text())
        assert sorted(e["book_id"] for e in report["downloaded"]) == sorted(
            int(b) for b in BOOKS.split(",") if int(b) % 2 == index
        )
        assert (work / "dataset" / "tasks" / f"t{index}of2.json").exists()
    manifest = json.loads((work / "dataset" / "manifest.json").read_text())
    assert manifest["num_tasks"] == 2
    assert sorted(d["book_id"] for d in manifest["documents"]) == sorted(int(b) for b in BOOKS.split(","))
    assert manifest["splits"]["train"]["tokens"] > 50_000
    log = (work / f"gptrain-preprocess-{finalize['JobId']}.out").read_text()
    assert f"fingerprint {manifest['fingerprint']}" in log


@pytest.mark.parametrize(
    "script, options",
    [
        ("preprocess.sbatch", ["--array=0-3"]),
        ("pretrain.sbatch", []),
        ("sweep.sbatch", []),
    ],
)
def test_scripts_are_accepted_by_slurm(
    slurm_cluster: SlurmCluster, tmp_path: Path, script: str, options: list[str]  # noqa: F811
) -> None:
    """sbatch --test-only checks a script's #SBATCH options against the cluster without running it
    (the pretrain script's two exclusive nodes, the sweep's `0-7%2` throttled array)."""
    out = slurm_cluster.run("sbatch", "--test-only", *options, str(SLURM / script), cwd=tmp_path)
    assert out == ""  # sbatch --test-only reports on stderr; run() already checked the status


def test_submit_rejects_an_unknown_stage(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:  # noqa: F811
    queued = slurm_cluster.run("squeue", "-h", "-o", "%i")
    with pytest.raises(AssertionError, match="unknown stage 'train'"):
        slurm_cluster.run("bash", str(SLURM / "submit.sh"), "preprocess", "train", cwd=tmp_path)
    assert slurm_cluster.run("squeue", "-h", "-o", "%i") == queued  # it checks before submitting anything


def test_pretrain_on_two_nodes_trains_with_world_size_four(pipeline: dict) -> None:
    work, ((finalize,), (pretrain,)) = pipeline["work"], (pipeline["finalize"], pipeline["pretrain"])
    _completed([pretrain])
    assert pretrain["NodeList"] == "n[1-2]" and pretrain["NumNodes"] == "2"
    assert pretrain["StartTime"] >= finalize["EndTime"]  # submit.sh chained it after finalize
    log = (work / f"gptrain-pretrain-{pretrain['JobId']}.out").read_text()
    assert "2 nodes x 2 workers" in log  # one torchrun per node, two workers each
    assert "4 rank(s) on cpu" in log
    records = _train_records(work / "run")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[-1]["loss"] < records[0]["loss"] - 1.0  # it learns
    assert records[-1]["tokens_seen"] == STEPS * 4 * 4 * 64  # 4 ranks x 4 windows x 64 tokens per step


def test_sweep_array_runs_every_trial_two_at_a_time(pipeline: dict) -> None:
    work, trials = pipeline["work"], pipeline["sweep"]
    assert sorted(r["ArrayTaskId"] for r in trials) == ["0", "1", "2", "3"]
    _completed(trials)
    assert all(r["ArrayTaskThrottle"] == "2" for r in trials)  # --array=0-3%2
    starts = sorted((r["StartTime"], r["EndTime"]) for r in trials)
    for i, (start, _) in enumerate(starts):  # never more than two running at once
        assert sum(1 for s, e in starts[:i] if e > start) <= 1, starts
    assert min(s for s, _ in starts) >= pipeline["finalize"][0]["EndTime"]  # chained after finalize
    for index in range(4):
        (trial_dir,) = (work / "sweep" / "trials").glob(f"{index}-*")
        record = json.loads((trial_dir / "trial.json").read_text())
        assert record["status"] == "done" and record["summary"]["steps"] == STEPS
    # The report over what the array produced: table, plots and the winning config.
    report = write_report(str(work / "sweep"))
    assert len(report.results) == 4 and all(r.status == "done" for r in report.results)
    assert report.best is not None
    for name in ("report.csv", "report.md", "top_trials_loss.png", "best_config.yaml"):
        assert (work / "sweep" / name).stat().st_size > 0, name
    assert list((work / "sweep").glob("val_loss_vs_*.png"))


def test_usr1_checkpoints_requeues_and_resumes_to_identical_weights(
    pipeline: dict, slurm_cluster: SlurmCluster  # noqa: F811
) -> None:
    """The same run, warned half way. `scancel --batch --signal=USR1` signals the batch shell,
    as the time-limit warning (--signal=B:USR1@300) does, so the trap that passes the signal
    on to the training step is tested too."""
    work, reference = pipeline["work"], pipeline["work"] / "run"
    run_dir = work / "run-interrupted"
    env = _train_env(slurm_cluster, work, run_dir)
    job = slurm_cluster.sbatch(
        f"--output={work}/%x-%j.out", str(SLURM / "pretrain.sbatch"), *TRAIN_OVERRIDES, cwd=work, env=env
    )
    deadline = time.monotonic() + 180
    while not any(r["step"] >= 4 for r in _train_records(run_dir)):
        assert time.monotonic() < deadline, f"no training progress in {run_dir}\n{slurm_cluster.log_tail()}"
        time.sleep(0.5)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)

    (record,) = slurm_cluster.wait(job, timeout=300)
    _completed([record])
    assert record["Restarts"] == "1"
    log = (work / f"gptrain-pretrain-{job}.out").read_text()
    assert "start 1:" in log and "start 2:" in log  # --open-mode=append kept the first run's log
    assert "time limit warning: passing USR1 to the job steps" in log
    (stopped,) = re.findall(r"preempted by SIGUSR1 at step (\d+): checkpoint committed", log)
    (resumed,) = re.findall(r"resumed from \S+ at step (\d+)", log)
    assert 4 <= int(stopped) == int(resumed) < STEPS
    # Every step once: the first run's up to the checkpoint, then the rerun's.
    assert [r["step"] for r in _train_records(run_dir)] == list(range(1, STEPS + 1))

    final, uninterrupted = load_model_from_checkpoint(str(run_dir)), load_model_from_checkpoint(str(reference))
    assert all(
        torch.equal(a, b) for a, b in zip(final.state_dict().values(), uninterrupted.state_dict().values(), strict=True)
    )
