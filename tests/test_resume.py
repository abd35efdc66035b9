"""`gptrain train` stopped and resumed, end to end, in real processes.

* SIGTERM at a step boundary -> synchronous save -> exit 75; the same command resumes, and
  every logged loss and the final weights equal those of an uninterrupted run (torch.equal):
  one process with gradient accumulation and dropout, stopped mid-epoch; and 2 DDP ranks.
* SIGKILL at random moments, half of them inside a save (a delay is injected after each
  shard write), 10 times over one run, with a shard of the newest checkpoint truncated once:
  each rerun resumes from a committed checkpoint, never a partial one, and the end result
  equals the uninterrupted run.
* 2 ranks -> 1 rank: the windows trained on are exactly the uninterrupted run's, none twice.
* An s3:// run directory on a real moto server: the same stop/resume.
* The resumed process continues the same (offline) W&B run.

Run as a script, this file is the training process those tests start (alone or under
torchrun). Its options instrument the real trainer for the tests; everything else is
`gptrain train` itself. With --fork-server it imports once and forks one training process
per line on stdin (the SIGKILL trials then cost no interpreter start-up):

    python tests/test_resume.py [--step-delay S] [--save-delay S] [--windows FILE] [--fork-server] -- train ARGS...
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).parent / "torchrun")

# ---------------------------------------------------------------------------------------------
# The worker.


def _instrument(step_delay: float, save_delay: float, windows: str | None) -> None:
    import torch.distributed.checkpoint.filesystem as dcp_filesystem

    from gptrain.data.loader import TokenLoader

    next_batch = TokenLoader.next_batch

    def logged_next_batch(self):
        batch = next_batch(self)
        if windows:
            with open(f"{windows}.rank{self.rank}", "a") as f:
                f.write(json.dumps(self.last_window_ids.tolist()) + "\n")
        time.sleep(step_delay)  # slow enough for a signal to land mid-run
        return batch

    TokenLoader.next_batch = logged_next_batch
    if save_delay:
        write_data = dcp_filesystem._FileSystemWriter.write_data

        def slow_write_data(self, plan, planner):
            future = write_data(self, plan, planner)
            future.wait()
            time.sleep(save_delay)  # this rank's shard is written; metadata and marker are not
            return future

        dcp_filesystem._FileSystemWriter.write_data = slow_write_data


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--save-delay", type=float, default=0.0)
    parser.add_argument("--windows")
    parser.add_argument("--fork-server", action="store_true")
    args, rest = parser.parse_known_args(argv)
    _instrument(args.step_delay, args.save_delay, args.windows)
    import gptrain.train.trainer  # noqa: F401  (the imports that make up most of a start)
    from gptrain.cli import main

    rest = [a for a in rest if a != "--"]
    if not args.fork_server:
        return main(rest)
    # One training process per line read, forked from this already-initialized one: a trial
    # of the SIGKILL test costs no interpreter start. Prints each child's pid, then its status.
    for _ in sys.stdin:
        pid = os.fork()
        if pid == 0:
            os._exit(main(rest))
        print(pid, flush=True)
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))


# ---------------------------------------------------------------------------------------------
# The tests.

import torch  # noqa: E402

from checkpoint_fixtures import TINY_MODEL, prepare_dataset, same_weights  # noqa: E402
from conftest import clean_env, is_running, stop_session  # noqa: E402
from gptrain.checkpoint import commit as commits  # noqa: E402
from gptrain.checkpoint.export import load_model_from_checkpoint  # noqa: E402
from gptrain.errors import EXIT_PREEMPTED  # noqa: E402
from gptrain.train.logger import read_metrics  # noqa: E402

STEPS = 16  # one process: 4 windows a step (2 x 2 accumulation) of 45 per epoch: crosses an epoch
WINDOWS = 40  # DDP runs: 40 of the 45 windows, all in epoch 0, so every window id is unique


def write_config(path: Path, data: Path, run_dir: str, train=(), checkpoint=(), logging=()) -> Path:
    """The tiny model's run config; `train`, `checkpoint` and `logging` update those sections."""
    config = {
        "model": TINY_MODEL,
        "data": {"path": str(data)},
        "optim": {"lr": 3e-3, "fused": False},
        "schedule": {"warmup_steps": 2},
        "train": {"run_dir": run_dir, "max_steps": STEPS, "micro_batch_size": 2, "grad_accum_steps": 2,
                  "device": "cpu", "log_every": 1, **dict(train)},
        "eval": {"every": 5, "max_windows": 4, "sample_prompt": ""},
        "checkpoint": {"every": 3, "keep_last": 2, **dict(checkpoint)},
        "logging": {"plot": False, **dict(logging)},
    }
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def _env() -> dict[str, str]:
    return clean_env(WANDB_MODE="offline", WANDB_SILENT="true")


def start(config: Path, *options: str, ranks: int = 0, log: Path) -> subprocess.Popen:
    """`gptrain train --config CONFIG` through this file's worker; under torchrun with `ranks` > 0,
    in a network namespace that has only loopback (torchrun's store listens on all interfaces)."""
    worker = [__file__, *options, "--", "train", "--config", str(config)]
    if ranks:
        torchrun = [TORCHRUN, "--standalone", f"--nproc-per-node={ranks}", *worker]
        command = ["unshare", "--net", "bash", "-c", "ip link set lo up && exec " + shlex.join(torchrun)]
    else:
        command = [PYTHON, *worker]
    # unshare and bash exec into torchrun: the PID we get is torchrun's, which forwards SIGTERM.
    proc = subprocess.Popen(command, env=_env(), stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    _started.append(proc)
    return proc


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def stop_leftover_processes():
    """A test that fails half way leaves no training process behind."""
    yield
    while _started:
        stop_session(_started.pop())


def finish(proc: subprocess.Popen, timeout: float = 120) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        stop_session(proc)
        pytest.fail(f"training process {proc.args} did not finish in {timeout}s")


def run(config: Path, *options: str, ranks: int = 0, log: Path) -> None:
    assert finish(start(config, *options, ranks=ranks, log=log)) == 0, log.read_text()[-3000:]


def wait_for(predicate, alive, timeout: float = 60, what: str = "", every: float = 0.02) -> None:
    """Poll `predicate` while `alive()` (a Popen's poll() is None, or a forked pid runs)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if not alive() or time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(every)


def running(proc: subprocess.Popen):
    return lambda: proc.poll() is None


class ForkServer:
    """This file's worker with --fork-server: `launch()` forks one `gptrain train` process.
    Leaving the `with` block stops the server and any training process still running."""

    def __init__(self, config: Path, *options: str, log: Path):
        self.proc = subprocess.Popen(
            [PYTHON, __file__, "--fork-server", *options, "--", "train", "--config", str(config)],
            env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("ab"), text=True,
            start_new_session=True,
        )

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the session this test started: server and child
            self.proc.wait()

    def launch(self) -> int:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def status(self) -> int:
        """The exit status of the last launch, once it has ended."""
        return int(self.proc.stdout.readline())

    @staticmethod
    def alive(pid: int):
        return lambda: is_running(pid)


def train_records(run_dir: Path) -> list[dict]:
    """The logged train records without the wall-clock ones (throughput depends on the machine)."""
    keep = ("step", "loss", "lr", "grad_norm", "tokens_seen")
    return [{k: r[k] for k in keep} for r in read_metrics(str(run_dir)) if r["kind"] == "train"]


def last_logged_step(run_dir: Path) -> int:
    return max((r["step"] for r in train_records(run_dir)), default=0)


def stop_with(sig: signal.Signals, config: Path, run_dir: Path, after_steps: int, log: Path, **kw) -> int:
    proc = start(config, "--step-delay", "0.1", log=log, **kw)
    wait_for(lambda: last_logged_step(run_dir) >= after_steps, running(proc), what=f"step {after_steps}")
    proc.send_signal(sig)
    return finish(proc)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepare_dataset(tmp_path_factory.mktemp("resume-data"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data) -> Path:
    """The uninterrupted single-process run the others must reproduce."""
    root = tmp_path_factory.mktemp("straight")
    run(write_config(root / "config.yaml", data, str(root / "run")), log=root / "log.txt")
    return root / "run"


def test_sigterm_mid_epoch_then_rerun_reproduces_every_loss_and_the_weights(tmp_path, data, straight):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", data, str(run_dir), logging={"wandb": True})
    log = tmp_path / "log.txt"
    assert stop_with(signal.SIGTERM, config, run_dir, after_steps=5, log=log) == EXIT_PREEMPTED
    text = log.read_text()
    stopped = re.search(r"preempted by SIGTERM at step (\d+): checkpoint committed ([\d.]+) s after the signal", text)
    assert stopped, text[-3000:]
    step = int(stopped.group(1))
    assert 5 <= step < 11  # mid-epoch: 4 windows a step, 45 in an epoch; the resumed run crosses into the next
    assert commits.committed(str(run_dir))[-1].step == step
    run(config, log=log)  # the same command again
    assert f"resumed from {run_dir}/checkpoints/step-{step} at step {step}" in log.read_text()
    assert train_records(run_dir) == train_records(straight)
    assert same_weights(load_model_from_checkpoint(str(run_dir)), load_model_from_checkpoint(str(straight)))
    # The resumed process continued the same W&B run (offline: one folder per process, one run id).
    wandb_runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and len({name.rpartition("-")[2] for name in wandb_runs}) == 1


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loads_a_partial_checkpoint(tmp_path, data, straight):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", data, str(run_dir))
    log = tmp_path / "log.txt"
    rng = random.Random(1234)

    def uncommitted() -> list[str]:
        return [url for _, url in commits.step_folders(str(run_dir)) if not (Path(url) / "commit.json").exists()]

    def newest_step() -> int:
        committed = commits.committed(str(run_dir))
        return committed[-1].step if committed else 0

    killed_in_save = 0
    with ForkServer(config, "--step-delay", "0.02", "--save-delay", "0.4", log=log) as server:
        for trial in range(10):
            resume_step = newest_step()
            offset = log.stat().st_size
            pid = server.launch()
            alive = server.alive(pid)
            if trial % 2 == 0:
                # Inside a save: this launch has trained a step (so its startup cleanup is done) and
                # a step folder has no marker yet; the marker comes 0.4 s after the shard.
                wait_for(lambda: b"INFO gptrain: step" in log.read_bytes()[offset:], alive, what="a training step")
                wait_for(lambda: bool(uncommitted()), alive, what="a save in progress")
                time.sleep(rng.uniform(0.0, 0.3))
            else:
                # Anywhere in the steps, evaluations and saves after this launch's first commit.
                wait_for(lambda: newest_step() > resume_step, alive, what="a commit")
                time.sleep(rng.uniform(0.0, 0.3))
            os.kill(pid, signal.SIGKILL)
            assert server.status() == -signal.SIGKILL
            killed_in_save += bool(uncommitted())
            for commit in commits.committed(str(run_dir)):
                commits.verify(commit)  # every committed checkpoint is complete
            if trial == 5:
                shard = Path(commits.committed(str(run_dir))[-1].url) / "__0_0.distcp"
                shard.write_bytes(shard.read_bytes()[:100])  # damaged after its commit
        server.launch()
        assert server.status() == 0, log.read_text()[-3000:]
    assert killed_in_save >= 5
    text = log.read_text()
    assert "__0_0.distcp has 100 bytes" in text and "falling back to the previous committed checkpoint" in text
    assert train_records(run_dir) == train_records(straight)
    assert same_weights(load_model_from_checkpoint(str(run_dir)), load_model_from_checkpoint(str(straight)))


@pytest.mark.slow
def test_two_ranks_sigterm_resume_and_a_world_size_change_keep_exact_token_accounting(tmp_path, data):
    tokens = {"train": {"max_steps": None, "max_tokens": WINDOWS * 32, "grad_accum_steps": 1}}
    straight_dir, stopped_dir, shrunk_dir = tmp_path / "straight", tmp_path / "stopped", tmp_path / "shrunk"
    log = tmp_path / "log.txt"
    straight_config = write_config(tmp_path / "straight.yaml", data, str(straight_dir), **tokens)
    run(straight_config, "--windows", str(tmp_path / "straight-windows"), ranks=2, log=log)

    # Async periodic saves on 2 ranks (the copy and the collectives in each rank's background
    # thread); the save on SIGTERM is synchronous.
    config = write_config(tmp_path / "stopped.yaml", data, str(stopped_dir), checkpoint={"async_save": True}, **tokens)
    options = ("--step-delay", "0.2", "--windows", str(tmp_path / "stopped-windows"))
    proc = start(config, *options, ranks=2, log=log)
    wait_for(lambda: last_logged_step(stopped_dir) >= 3, running(proc), what="step 3")
    proc.send_signal(signal.SIGTERM)  # to torchrun, which forwards it to both ranks
    finish(proc)
    stop = commits.committed(str(stopped_dir))[-1]
    assert stop.world_size == 2 and 3 <= stop.step < WINDOWS // 4
    assert f"preempted by SIGTERM at step {stop.step}" in log.read_text()
    shutil.copytree(stopped_dir, shrunk_dir)  # the same stop, resumed by 1 rank below
    shutil.copy(tmp_path / "stopped-windows.rank0", tmp_path / "shrunk-windows.rank0")
    shutil.copy(tmp_path / "stopped-windows.rank1", tmp_path / "shrunk-windows.rank1")

    run(config, "--windows", str(tmp_path / "stopped-windows"), ranks=2, log=log)
    assert train_records(stopped_dir) == train_records(straight_dir)
    saves = [r for r in read_metrics(str(stopped_dir)) if r["kind"] == "checkpoint"]
    assert stop.step in [r["step"] for r in saves] and any(r["async"] and r["copy_s"] is not None for r in saves)
    assert same_weights(load_model_from_checkpoint(str(stopped_dir)), load_model_from_checkpoint(str(straight_dir)))

    shrunk = write_config(tmp_path / "shrunk.yaml", data, str(shrunk_dir), **tokens)
    run(shrunk, "--windows", str(tmp_path / "shrunk-windows"), log=log)
    assert "resuming a 2-rank checkpoint with 1 rank(s)" in log.read_text()

    def windows(prefix: str) -> list[int]:
        ids = []
        for path in sorted(tmp_path.glob(f"{prefix}-windows.rank*")):
            ids += [i for line in path.read_text().splitlines() for i in json.loads(line)]
        return ids

    expected = windows("straight")
    assert len(expected) == WINDOWS and len(set(expected)) == WINDOWS
    resumed = windows("shrunk")  # 2 ranks up to the stop, then 1 rank
    assert sorted(resumed) == sorted(expected), "a window was repeated or skipped"
    records = train_records(shrunk_dir)
    assert records[-1]["tokens_seen"] == WINDOWS * 32
    assert [r["step"] for r in records] == list(range(1, records[-1]["step"] + 1))


def test_s3_run_directory_stops_and_resumes_exactly(s3_bucket, tmp_path, data, straight):
    run_dir = f"{s3_bucket}/runs/resume"
    config = write_config(tmp_path / "config.yaml", data, run_dir, checkpoint={"every": 4})
    log = tmp_path / "log.txt"
    proc = start(config, "--step-delay", "0.1", log=log)
    wait_for(lambda: len(commits.committed(run_dir)) >= 1, running(proc), what="a checkpoint on S3", every=0.2)
    proc.send_signal(signal.SIGTERM)
    assert finish(proc) == EXIT_PREEMPTED, log.read_text()[-3000:]
    run(config, log=log)
    assert re.search(rf"resumed from {run_dir}/checkpoints/step-\d+", log.read_text())
    final = load_model_from_checkpoint(run_dir)
    assert same_weights(final, load_model_from_checkpoint(str(straight)))
    assert torch.equal(final.lm_head.weight, final.tok_emb.weight)  # tied, as trained
