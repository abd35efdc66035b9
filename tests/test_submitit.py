"""jobs/ (submitit) on the real Slurm cluster of tests/slurm_cluster.py, and on submitit's local
cluster: preprocess as a map_array plus a dependent finalize job, pretraining on 2 nodes x 2
tasks (under srun --kill-on-bad-exit) chained after it and interrupted half way (every rank
checkpoints, rank 0 requeues while the others wait, it resumes and completes), a sweep as a
map_array."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit

from gptrain.errors import GptrainError
from gptrain.train.logger import read_metrics
from gptrain.checkpoint import commit as commits
from jobs import Resources, submit_preprocess, submit_pretrain, submit_sweep
from jobs.resources import make_executor
from slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401 (a fixture)

BOOKS = "11,35,41,46,74,1080"  # three odd and three even ids: each of two tasks gets books


def test_resources_refuse_bad_values() -> None:
    with pytest.raises(GptrainError, match="nodes=0 must be >= 1"):
        Resources(nodes=0)
    with pytest.raises(GptrainError, match="signal_delay_s=3600 must be >= 0 and less than timeout_min"):
        Resources(timeout_min=60, signal_delay_s=3600)
    with pytest.raises(GptrainError, match="'account' must look like KEY=VALUE"):
        Resources(slurm_options=("account",))
    assert Resources(slurm_options=("--account=proj", "qos=high")).additional_parameters() == {
        "account": "proj", "qos": "high",
    }
    assert Resources(nodes=2, tasks_per_node=4).single_process() == Resources()
    with pytest.raises(GptrainError, match="max_num_timeout=-1 must be >= 0"):
        Resources(max_num_timeout=-1)
    # Multi-day runs: many more time-limit requeues than submitit's default 3; fail fast.
    executor = make_executor("slurm", "unused/%j", Resources(), "name")
    assert executor._executor.max_num_timeout == Resources().max_num_timeout == 100
    assert executor._executor.parameters["srun_args"] == ["--kill-on-bad-exit=1"]


@pytest.fixture
def on_cluster(slurm_cluster: SlurmCluster, monkeypatch) -> SlurmCluster:  # noqa: F811
    """submitit in this process submits to the test cluster (its sbatch, scancel, ... on PATH)."""
    for key, value in slurm_cluster.env().items():
        monkeypatch.setenv(key, value)
    return slurm_cluster


def _wait(jobs: list[submitit.Job], timeout: float) -> None:
    """Wait for results (this cluster has no accounting, so submitit cannot tell a job that
    died without one from a running job: give up after `timeout`)."""
    deadline = time.monotonic() + timeout
    while not all(job.done() for job in jobs):
        if time.monotonic() > deadline:
            pytest.fail(f"jobs {[j.job_id for j in jobs]} not done after {timeout:.0f} s:\n{jobs[0].stderr()}")
        time.sleep(1)


@pytest.mark.slow
def test_local_cluster_cli_builds_the_dataset(mirror_dir: Path, tmp_path: Path) -> None:
    """`python -m jobs preprocess --cluster local`: array tasks and finalize as local processes."""
    done = subprocess.run(
        [sys.executable, "-m", "jobs", "preprocess", "--cluster", "local", "--folder", f"{tmp_path}/submitit/%j",
         "--mirror", str(mirror_dir), "--raw", str(tmp_path / "raw"), "--dataset", str(tmp_path / "dataset"),
         "--tasks", "2", "--download-args", f"--ids {BOOKS}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("preprocess ") and len(lines[0].split()) == 3  # two array tasks
    manifest = json.loads((tmp_path / "dataset" / "manifest.json").read_text())
    assert manifest["num_tasks"] == 2 and len(manifest["documents"]) == 6
    assert lines[-1].endswith(f"result: {manifest['fingerprint']!r}")  # finalize returns the fingerprint


STEPS = 16
TRAIN_OVERRIDES = [  # the debug preset, short (as in test_slurm.py)
    f"train.max_steps={STEPS}", "schedule.warmup_steps=4", "train.log_every=1", "eval.every=0",
    "eval.max_windows=4", "eval.sample_prompt=", "logging.plot=false", "checkpoint.every=0",
]


@pytest.fixture(scope="module")
def chain(slurm_cluster: SlurmCluster, mirror_dir: Path, tmp_path_factory) -> dict:  # noqa: F811
    """Preprocess (a map_array of 2 tasks, then finalize) and 2-node pretraining chained after
    it, submitted together with submitit."""
    work = tmp_path_factory.mktemp("submitit")
    folder = f"{work}/submitit/%j"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in slurm_cluster.env().items():
            patch.setenv(key, value)
        array, finalize_job = submit_preprocess(
            "slurm", folder, Resources(timeout_min=10), mirror=str(mirror_dir), raw=str(work / "raw"),
            dataset=str(work / "dataset"), num_tasks=2, download_args=["--ids", BOOKS],
        )
        pretrain = submit_pretrain(
            "slurm", folder, Resources(nodes=2, tasks_per_node=2, timeout_min=60), config="debug",
            overrides=[f"data.path={work / 'dataset'}", f"train.run_dir={work / 'run'}", *TRAIN_OVERRIDES],
            after=[finalize_job],
        )
        (record,) = slurm_cluster.jobs(pretrain.job_id)
    return {"work": work, "folder": folder, "array": array, "finalize": finalize_job, "pretrain": pretrain,
            "pretrain_dependency": record["Dependency"], "pretrain_kill_on_invalid_dep": record["KillOInInvalidDependent"]}


@pytest.mark.slow
def test_preprocess_map_array_then_finalize(chain: dict, on_cluster: SlurmCluster) -> None:
    _wait([*chain["array"], chain["finalize"]], timeout=120)
    assert [job.result() for job in chain["array"]] == [None, None]
    manifest = json.loads((chain["work"] / "dataset" / "manifest.json").read_text())
    assert chain["finalize"].result() == manifest["fingerprint"]
    assert manifest["num_tasks"] == 2 and len(manifest["documents"]) == 6
    array_id = chain["array"][0].job_id.split("_")[0]
    assert chain["finalize"].job_id != array_id and all(j.job_id.startswith(f"{array_id}_") for j in chain["array"])


@pytest.mark.slow
def test_pretrain_interrupted_resumes_and_completes(chain: dict, on_cluster: SlurmCluster) -> None:
    """job._interrupt() signals a preemption (SIGTERM, then submitit's USR2); with a 60-minute
    limit submitit counts it as one, not as a timeout. Every rank saves its part of the
    checkpoint; rank 0 has submitit requeue the job while the others wait (under srun
    --kill-on-bad-exit, a rank leaving first would have ended rank 0 before the requeue), and
    the rerun resumes from it."""
    job, run_dir = chain["pretrain"], chain["work"] / "run"
    # Submitted while preprocessing ran: it waited for finalize (or the dependency was met by then).
    assert chain["pretrain_dependency"].startswith(f"afterok:{chain['finalize'].job_id}") or (
        chain["pretrain_dependency"] == "(null)"
    )
    assert chain["pretrain_kill_on_invalid_dep"] == "Yes"  # cancelled, not pending forever, if finalize fails
    deadline = time.monotonic() + 240
    while not _trained_steps(run_dir) or max(_trained_steps(run_dir)) < 4:
        assert time.monotonic() < deadline, f"no training progress in {run_dir}:\n{job.stderr()}"
        time.sleep(0.5)
    job._interrupt()

    _wait([job], timeout=300)
    summaries = job.results()  # one per rank
    assert len(summaries) == 4 and all(s["steps"] == STEPS for s in summaries)
    (record,) = on_cluster.jobs(job.job_id)
    assert record["Restarts"] == "1" and record["NodeList"] == "n[1-2]"
    log = job.stdout() + job.stderr()
    assert "this job is preempted" in log and "Calling checkpoint method" in log and "Requeued job" in log
    (stopped,) = re.findall(r"preempted by SIG\S+ at step (\d+): checkpoint committed", log)
    (resumed,) = re.findall(r"resumed from \S+ at step (\d+)", log)  # rank 0 logs both
    assert 4 <= int(stopped) == int(resumed) < STEPS
    (preempted,) = [c for c in commits.committed(str(run_dir)) if c.step == int(stopped)]
    assert preempted.world_size == 4  # all four ranks wrote their shards
    assert _trained_steps(run_dir) == list(range(1, STEPS + 1))


def _trained_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(str(run_dir)) if r["kind"] == "train"]


@pytest.mark.slow
def test_sweep_trials_as_a_map_array(chain: dict, on_cluster: SlurmCluster) -> None:
    work = chain["work"]
    jobs = submit_sweep(
        "slurm", chain["folder"], Resources(timeout_min=60, array_parallelism=2), spec="debug-4",
        overrides=[f"data.path={work / 'dataset'}", "train.max_steps=10", "eval.every=5", "checkpoint.every=5"],
        sweep_dir=str(work / "sweep"), after=[chain["finalize"]],
    )
    assert len(jobs) == 4  # every trial of debug-4
    records = on_cluster.jobs(jobs[0].job_id.split("_")[0])
    assert all(r["ArrayTaskThrottle"] == "2" for r in records)
    _wait(jobs, timeout=240)
    assert [job.result() for job in jobs] == [None] * 4
    for index in range(4):
        (trial_dir,) = (work / "sweep" / "trials").glob(f"{index}-*")
        record = json.loads((trial_dir / "trial.json").read_text())
        assert record["status"] == "done" and record["summary"]["steps"] == 10
