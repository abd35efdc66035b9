"""The project's Slurm scripts (slurm/) on a real Slurm cluster: slurmctld and two slurmd
emulating nodes n1 and n2 (tests/slurm_cluster.py).

slurm/submit.sh submits the preprocess job array (download + prepare, four tasks over six real
books), the finalize job that depends on it, a pretraining job on both nodes (two srun tasks,
ranks, on each: world size 4) that depends on finalize, and a sweep array. Then, with the
dataset built: resubmitting some array ids reruns exactly those tasks of the split; a config
error ends pretraining with status 2, unrequeued; a rank SIGKILLed mid-training takes the job
down at once, and the resubmitted job resumes, is warned with `scancel --signal=USR1` in a
step that has no Slurm client (a container's), checkpoints, is requeued by its batch shell,
resumes again, and ends with exactly the weights of the uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from gptrain.checkpoint import commit as commits
from gptrain.checkpoint.export import load_model_from_checkpoint
from gptrain.sweep.report import write_report
from gptrain.train.logger import read_metrics
from slurm_cluster import REPO, VENV, SlurmCluster, slurm_cluster  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow

SLURM = REPO / "slurm"
# Book ids whose remainders mod 4 cover every task of a four-task array.
BOOKS = "11,35,41,46,74,1080"
TASKS = 4
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
        GPTRAIN_ARRAY_TASKS=str(TASKS),
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
    assert sorted(r["ArrayTaskId"] for r in array) == [str(i) for i in range(TASKS)]
    _completed(array)
    _completed([finalize])
    assert finalize["StartTime"] >= max(r["EndTime"] for r in array)  # ISO times sort as text
    # Dependent jobs are cancelled, not left pending forever, if what they wait for fails.
    assert all(r["KillOInInvalidDependent"] == "Yes" for r in (finalize, *pipeline["pretrain"], *pipeline["sweep"]))

    # Each task downloaded and tokenized its share of the books; finalize merged them.
    for index in range(TASKS):
        report = json.loads((work / "raw" / "reports" / f"download-{index}-of-{TASKS}.json").read_text())
        assert sorted(e["book_id"] for e in report["downloaded"]) == sorted(
            int(b) for b in BOOKS.split(",") if int(b) % TASKS == index
        )
        assert (work / "dataset" / "tasks" / f"t{index}of{TASKS}.json").exists()
    manifest = json.loads((work / "dataset" / "manifest.json").read_text())
    assert manifest["num_tasks"] == TASKS
    assert sorted(d["book_id"] for d in manifest["documents"]) == sorted(int(b) for b in BOOKS.split(","))
    assert manifest["splits"]["train"]["tokens"] > 50_000
    log = (work / f"gptrain-preprocess-{finalize['JobId']}.out").read_text()
    assert f"fingerprint {manifest['fingerprint']}" in log


def _dataset_files(dataset: Path) -> dict[str, tuple[int, int, str]]:
    """{shard or marker: (inode, mtime in ns, sha256)}"""
    files = {}
    for path in [*(dataset / "shards").iterdir(), *(dataset / "tasks").iterdir()]:
        stat = path.stat()
        files[path.name] = (stat.st_ino, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return files


def test_rerunning_some_array_ids_redoes_exactly_those_tasks_and_finalize_accepts_them(
    pipeline: dict, slurm_cluster: SlurmCluster, mirror_dir: Path  # noqa: F811
) -> None:
    """After the full four-task run, tasks whose output is gone (a failed task leaves no done
    marker) are rerun by their ids, as `sbatch --array=1` and `--array=1,3`: only their shards
    are written again, byte for byte, and finalize passes with the original fingerprint."""
    work = pipeline["work"]
    env = _preprocess_env(slurm_cluster, work, mirror_dir)
    dataset = work / "dataset"
    fingerprint = json.loads((dataset / "manifest.json").read_text())["fingerprint"]

    # Ids beyond the split are refused (status 2) by every task before any work, and the
    # finalize job waiting for them is cancelled instead of pending forever.
    before = _dataset_files(dataset)
    records, finalize = _rerun_then_finalize(slurm_cluster, work, env, "1,5")
    assert {(r["ArrayTaskId"], r["JobState"], r["ExitCode"]) for r in records} == {
        ("1", "FAILED", "2:0"), ("5", "FAILED", "2:0")}
    assert (finalize["JobState"], finalize["Reason"]) == ("CANCELLED", "DependencyNeverSatisfied")
    assert _dataset_files(dataset) == before

    for ids in ("1", "1,3"):
        rerun = {int(i) for i in ids.split(",")}
        for index in rerun:  # as a failed task leaves it: no done marker, no manifest
            (dataset / "tasks" / f"t{index}of{TASKS}.json").unlink()
        (dataset / "manifest.json").unlink()
        before = _dataset_files(dataset)
        records, finalize = _rerun_then_finalize(slurm_cluster, work, env, ids)
        assert sorted(int(r["ArrayTaskId"]) for r in records) == sorted(rerun)
        _completed([*records, finalize])
        after = _dataset_files(dataset)
        assert after.keys() == before.keys() | {f"t{i}of{TASKS}.json" for i in rerun}
        for name, (inode, mtime, sha) in after.items():
            task = int(re.search(rf"t(\d+)of{TASKS}", name)[1])
            if task in rerun:
                assert name not in before or (before[name][:2] != (inode, mtime) and before[name][2] == sha), name
            else:
                assert before[name] == (inode, mtime, sha), name  # untouched
        assert json.loads((dataset / "manifest.json").read_text())["fingerprint"] == fingerprint


def _preprocess_env(cluster: SlurmCluster, work: Path, mirror: Path) -> dict[str, str]:
    return cluster.env(
        GPTRAIN_MIRROR=str(mirror), GPTRAIN_RAW=str(work / "raw"), GPTRAIN_DATASET=str(work / "dataset"),
        GPTRAIN_DOWNLOAD_ARGS=f"--ids {BOOKS}",  # GPTRAIN_ARRAY_TASKS: the default 4, as submitted
    )


def _rerun_then_finalize(
    cluster: SlurmCluster, work: Path, env: dict[str, str], ids: str
) -> tuple[list[dict[str, str]], dict[str, str]]:
    """`sbatch --array=IDS preprocess.sbatch`, then finalize after it, as its header says."""
    array = cluster.sbatch(f"--output={work}/%x-%A_%a.out", f"--array={ids}", str(SLURM / "preprocess.sbatch"),
                           cwd=work, env=env)
    finalize = cluster.sbatch(f"--output={work}/%x-%j.out", f"--dependency=afterok:{array}",
                              "--kill-on-invalid-dep=yes", str(SLURM / "preprocess.sbatch"), "finalize",
                              cwd=work, env=env)
    records = cluster.wait(array, timeout=120)
    (finalize_record,) = cluster.wait(finalize, timeout=60)
    return records, finalize_record


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
    assert "2 nodes x 2 ranks" in log  # two srun tasks per node
    assert re.search(r"^0: .* 4 rank\(s\) on cpu", log, re.MULTILINE)  # lines labelled with their rank
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


def test_a_config_error_fails_the_job_with_status_2_unrequeued(
    pipeline: dict, slurm_cluster: SlurmCluster  # noqa: F811
) -> None:
    work = pipeline["work"]
    env = _train_env(slurm_cluster, work, work / "run-bad-config")
    job = slurm_cluster.sbatch(f"--output={work}/%x-%j.out", str(SLURM / "pretrain.sbatch"), *TRAIN_OVERRIDES,
                               "optim.lr=fast", cwd=work, env=env)
    (record,) = slurm_cluster.wait(job, timeout=120)
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("FAILED", "2:0", "0")
    log = (work / f"gptrain-pretrain-{job}.out").read_text()
    for rank in range(4):
        assert f"{rank}: gptrain train: error: preset 'debug' with overrides" in log, log
    assert "the step failed with status 2" in log


def _job_processes(job: str) -> dict[int, str]:
    """{pid: command line} of this machine's processes that belong to Slurm job `job` (the
    emulated nodes are this machine): the batch shell, srun, the ranks."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            if f"SLURM_JOB_ID={job}".encode() in environ and os.getpid() != int(proc.name):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (FileNotFoundError, ProcessLookupError, PermissionError):  # ended meanwhile, or not ours
            continue
    return found


def _rank_pid(job: str, rank: int) -> int:
    for pid, command in _job_processes(job).items():
        if "gptrain train" in command and "bash" not in command:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"SLURM_PROCID={rank}".encode() in environ:
                return pid
    raise AssertionError(f"no rank {rank} of job {job} among {_job_processes(job)}")


def _wait_for_step(run_dir: Path, step: int, cluster: SlurmCluster, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not any(r["step"] >= step for r in _train_records(run_dir)):
        assert time.monotonic() < deadline, f"no step {step} in {run_dir}\n{cluster.log_tail()}"
        time.sleep(0.2)


def test_a_killed_rank_ends_the_job_and_a_container_step_is_requeued_from_the_host(
    pipeline: dict, slurm_cluster: SlurmCluster, tmp_path: Path  # noqa: F811
) -> None:
    """The pipeline's run again, with a checkpoint every 4 steps. First a rank is SIGKILLed
    mid-training: srun (--kill-on-bad-exit) ends the other ranks, the job fails. Resubmitted,
    it resumes from the newest checkpoint, in job steps that run in an "image" without a Slurm
    client: only bash, sh and gptrain are on their PATH (GPTRAIN_STEP_WRAPPER, as a container
    runtime would be given). `scancel --batch --signal=USR1` warns the batch shell, as the
    time-limit warning (--signal=B:USR1@300) does; its trap passes the signal to the ranks,
    which checkpoint and exit 75, and the batch shell requeues the job. The requeued job
    resumes and finishes with exactly the weights of the uninterrupted run."""
    work, reference = pipeline["work"], pipeline["work"] / "run"
    run_dir = work / "run-interrupted"
    overrides = [*TRAIN_OVERRIDES, "checkpoint.every=4"]

    job = slurm_cluster.sbatch(f"--output={work}/%x-%j.out", str(SLURM / "pretrain.sbatch"), *overrides, cwd=work,
                               env=_train_env(slurm_cluster, work, run_dir))
    _wait_for_step(run_dir, 6, slurm_cluster)
    killed_at = time.monotonic()
    os.kill(_rank_pid(job, 3), signal.SIGKILL)
    while _job_processes(job):
        assert time.monotonic() - killed_at < 120, _job_processes(job)
        time.sleep(0.05)
    gone_s = time.monotonic() - killed_at
    (record,) = slurm_cluster.wait(job, timeout=60)
    print(f"slurm test: rank 3 SIGKILLed; the other ranks, srun and the batch shell gone {gone_s:.2f} s later")
    assert gone_s < 60
    assert record["JobState"] == "FAILED" and record["ExitCode"] not in ("0:0", "2:0", "75:0"), record
    assert record["Restarts"] == "0"
    newest = max(_committed_steps(run_dir))
    assert newest >= 4

    image = tmp_path / "image"
    (image / "bin").mkdir(parents=True)
    for tool in ("bash", "sh"):
        (image / "bin" / tool).symlink_to(Path("/bin") / tool)
    (image / "bin" / "gptrain").symlink_to(VENV / "bin" / "gptrain")
    enter = image / "enter"
    enter.write_text(
        f"#!/bin/sh\nPATH={image / 'bin'}; export PATH\n"
        'if command -v scontrol >/dev/null 2>&1; then echo "scontrol is visible in the step" >&2; exit 99; fi\n'
        'exec "$@"\n'
    )
    enter.chmod(0o755)
    job = slurm_cluster.sbatch(f"--output={work}/%x-%j.out", str(SLURM / "pretrain.sbatch"), *overrides, cwd=work,
                               env=_train_env(slurm_cluster, work, run_dir, GPTRAIN_STEP_WRAPPER=str(enter)))
    log = work / f"gptrain-pretrain-{job}.out"
    deadline = time.monotonic() + 180
    while not (log.exists() and f"resumed from {run_dir}/checkpoints/step-{newest} " in log.read_text()):
        assert time.monotonic() < deadline, f"job {job} did not resume\n{slurm_cluster.log_tail()}"
        time.sleep(0.2)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)  # it stops after one step at least

    (record,) = slurm_cluster.wait(job, timeout=300)
    _completed([record])
    assert record["Restarts"] == "1"
    log = (work / f"gptrain-pretrain-{job}.out").read_text()
    assert "start 1:" in log and "start 2:" in log  # --open-mode=append kept the first run's log
    assert "time limit warning: passing USR1 to the job steps" in log
    assert "preempted after a checkpoint (status 75): requeueing, restart 1 of at most 100" in log
    (stopped,) = re.findall(r"preempted by SIGUSR1 at step (\d+): checkpoint committed", log)
    assert re.findall(r"resumed from \S+ at step (\d+)", log) == [str(newest), stopped]
    assert newest < int(stopped) < STEPS
    # Every step once: the first run's up to the checkpoint, then the rerun's.
    assert [r["step"] for r in _train_records(run_dir)] == list(range(1, STEPS + 1))

    final, uninterrupted = load_model_from_checkpoint(str(run_dir)), load_model_from_checkpoint(str(reference))
    assert all(
        torch.equal(a, b) for a, b in zip(final.state_dict().values(), uninterrupted.state_dict().values(), strict=True)
    )


def _committed_steps(run_dir: Path) -> list[int]:
    return [commit.step for commit in commits.committed(str(run_dir))]
