"""`gptrain launch` (gptrain/launch.py): the exit-status contract and fail-fast, for real.

Two ranks of `gptrain train` on one node (gloo, in a network namespace that has only loopback):
a config error ends the launcher with 2; SIGTERM to the launcher reaches both ranks, which
save a checkpoint and stop, and the launcher exits 75; a rank SIGKILLed mid-training takes
the other rank and the launcher down at once, with the dead rank's status; rerunning the
same command resumes from the newest committed checkpoint and finishes.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from checkpoint_fixtures import TINY_MODEL, prepare_dataset
from conftest import VENV_BIN, clean_env, is_running, launched_workers, stop_session
from gptrain.checkpoint import commit as commits
from gptrain.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_PREEMPTED, describe_status, exit_status
from gptrain.launch import Layout, combined_status

STEPS = 40


def test_statuses_follow_the_contract():
    assert combined_status([0, 0]) == EXIT_OK
    assert combined_status([75, 75]) == EXIT_PREEMPTED
    assert combined_status([0, 75]) == EXIT_PREEMPTED  # resumable: the rerun finishes at once
    assert combined_status([2, 137]) == EXIT_BAD_INPUT  # the first failure; the second was killed for it
    assert combined_status([75, 137, 1]) == 137
    assert [exit_status(code) for code in (0, 2, 75, -9, -15)] == [0, 2, 75, 137, 143]
    assert describe_status(137) == "was killed by SIGKILL (status 137)"
    assert describe_status(2) == "exited with status 2 (bad input)"


def test_layout_numbers_ranks_node_by_node():
    layout = Layout(nproc_per_node=4, nnodes=2, node_rank=1, master_addr="pretrain-0.pretrain", master_port=29500)
    env = layout.worker_env(2)
    assert env == {"RANK": "6", "LOCAL_RANK": "2", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
                   "MASTER_ADDR": "pretrain-0.pretrain", "MASTER_PORT": "29500"}
    from gptrain.distributed import detect_env

    assert (detect_env(env).rank, detect_env(env).node_rank) == (6, 1)
    from gptrain.errors import GptrainError

    with pytest.raises(GptrainError, match="--node-rank 2: must be in 0..1"):
        Layout(nproc_per_node=1, nnodes=2, node_rank=2, master_addr="x", master_port=1)


def launch(run_dir: Path, data: Path, log: Path, *overrides: str) -> subprocess.Popen:
    """`gptrain launch --nproc-per-node 2 -- train ...` in a loopback-only network namespace
    (rank 0's store listens on all interfaces); unshare and bash exec, so the PID is the launcher's."""
    command = [
        str(VENV_BIN / "gptrain"), "launch", "--nproc-per-node", "2", "--master-port", "29561", "--",
        "train", "--config", "debug", f"data.path={data}", f"train.run_dir={run_dir}",
        f"model.context_length={TINY_MODEL['context_length']}", f"model.d_model={TINY_MODEL['d_model']}",
        f"model.n_heads={TINY_MODEL['n_heads']}", f"model.d_ff={TINY_MODEL['d_ff']}",
        f"train.max_steps={STEPS}", "train.micro_batch_size=2", "train.log_every=1", "schedule.warmup_steps=2",
        "eval.every=0", "eval.max_windows=2", "eval.sample_prompt=", "logging.plot=false", "checkpoint.every=5",
        *overrides,
    ]
    return subprocess.Popen(
        ["unshare", "--net", "bash", "-c", "ip link set lo up && exec " + shlex.join(command)],
        env=clean_env(), stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def newest_commit(run_dir: Path) -> int:
    committed = commits.committed(str(run_dir))
    return committed[-1].step if committed else 0


def wait_until(predicate, proc: subprocess.Popen, log: Path, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what} (launcher status {proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 120) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        stop_session(proc)
        pytest.fail(f"the launcher did not finish in {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_two_ranks_keep_the_exit_status_contract_and_fail_fast(tmp_path):
    data, run_dir = prepare_dataset(tmp_path / "data"), tmp_path / "run"

    # Bad input: the first rank to refuse it ends the launch (the other is killed at once), and
    # the launcher exits 2, which a scheduler never retries.
    log = tmp_path / "bad-config.log"
    assert finish(launch(run_dir, data, log, "optim.lr=fast"), log) == EXIT_BAD_INPUT
    assert re.search(r"^\[rank [01]\] gptrain train: error: preset 'debug' with overrides .* optim.lr='fast'",
                     log.read_text(), re.MULTILINE), log.read_text()

    # SIGTERM to the launcher (the kubelet's, docker stop's, Slurm's): both ranks stop at the
    # same step, the checkpoint is committed, and the launcher exits 75.
    log = tmp_path / "preempted.log"
    proc = launch(run_dir, data, log)
    wait_until(lambda: newest_commit(run_dir) >= 5, proc, log, "the first checkpoint")
    proc.send_signal(signal.SIGTERM)
    assert finish(proc, log) == EXIT_PREEMPTED, log.read_text()[-3000:]
    text = log.read_text()
    assert "\n[rank 1] " in text  # each worker's lines carry its rank
    (stopped,) = re.findall(r"\[rank 0\] .*preempted by SIGTERM at step (\d+): checkpoint committed", text)
    assert 5 <= int(stopped) < STEPS and newest_commit(run_dir) == int(stopped)
    assert json.loads((run_dir / "checkpoints" / f"step-{stopped}" / "commit.json").read_text())["world_size"] == 2

    # A rank SIGKILLed mid-training: the launcher kills the other rank and exits with the dead
    # rank's status (a crash), within seconds rather than a collective's timeout.
    log = tmp_path / "crashed.log"
    proc = launch(run_dir, data, log)
    wait_until(lambda: newest_commit(run_dir) > int(stopped) and len(launched_workers(proc.pid)) == 2, proc, log,
               "a checkpoint after the resume")
    ranks = launched_workers(proc.pid)
    killed_after = newest_commit(run_dir)
    started = time.monotonic()
    subprocess.run(["kill", "-KILL", str(ranks[1])], check=True)
    status = finish(proc, log)
    while is_running(ranks[0]):
        time.sleep(0.01)
    gone_s = time.monotonic() - started
    print(f"launch test: rank 1 SIGKILLed; rank 0 and the launcher gone {gone_s:.2f} s later")
    assert status == 137 and gone_s < 60, (status, gone_s)
    assert "rank 1 was killed by SIGKILL (status 137): killing the other workers" in log.read_text()

    # The same command again resumes from the newest committed checkpoint and finishes.
    log = tmp_path / "resumed.log"
    resume_from = newest_commit(run_dir)
    assert resume_from >= killed_after
    assert finish(launch(run_dir, data, log), log) == EXIT_OK, log.read_text()[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step-{resume_from} at step {resume_from}" in log.read_text()
    assert newest_commit(run_dir) == STEPS
