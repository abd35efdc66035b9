"""Reliability, end to end and with real components: one writer per run directory (local and
S3), checksummed checkpoints, metrics that survive a SIGKILL on object storage, storage
faults injected by an HTTP proxy in front of the S3 server (tests/fault_proxy.py), a full
disk (a small tmpfs in a private mount namespace), clear errors at startup, the final save
before the final evaluation, and seeded kill trials (benchmarks/kill_trials.py, which runs
more of them).

Training processes are tests/test_resume.py's worker (the real `gptrain train`); "bitwise"
means every logged loss and the final weights equal an uninterrupted run's (torch.equal).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import test_resume
from checkpoint_fixtures import run_config, same_weights
from conftest import REPO, clean_env, free_port
from fault_proxy import Fault, FaultProxy, checkpoint_write, writes
from gptrain import storage
from gptrain.checkpoint import commit as commits
from gptrain.checkpoint.export import load_model_from_checkpoint
from gptrain.checkpoint.lease import LEASE_FILE, LeaseLostError, RunDirectoryBusyError, RunLease
from gptrain.cli import main as gptrain_main
from gptrain.config import load_config
from gptrain.data.prepare import PrepareConfig, run_prepare
from gptrain.train import trainer as trainer_module
from gptrain.train.logger import read_metrics
from prepare_fixtures import raw_dir
from test_checkpoint import run as train_in_process
from test_resume import (  # noqa: F401  (fixtures: the dataset, the uninterrupted run; stopping what `start` started)
    PYTHON,
    STEPS,
    data,
    finish,
    run,
    running,
    start,
    stop_leftover_processes,
    straight,
    train_records,
    wait_for,
    write_config,
)

sys.path.insert(0, str(REPO / "benchmarks"))
from kill_trials import run_trials  # noqa: E402


def assert_bitwise(run_dir: str | Path, straight: Path) -> None:  # noqa: F811
    assert train_records(run_dir) == train_records(straight)
    assert same_weights(load_model_from_checkpoint(str(run_dir)), load_model_from_checkpoint(str(straight)))


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("gptrain train: ")]


# ---------------------------------------------------------------------------------------------
# One writer per run directory.


def refused_naming(config: Path, holder: subprocess.Popen, capsys) -> None:
    """`gptrain train` of `config` in this test's process (a second process on the run
    directory, without another interpreter start) is refused, naming `holder`."""
    assert gptrain_main(["train", "--config", str(config)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"is in use by another run: pid {holder.pid} on {socket.gethostname()}" in line


def test_second_writer_is_refused_naming_the_first_and_a_killed_holder_is_taken_over(
        tmp_path, data, straight, capsys):  # noqa: F811
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", data, str(run_dir))
    log = tmp_path / "log.txt"
    first = start(config, "--step-delay", "0.2", log=log)
    wait_for(lambda: bool(commits.committed(str(run_dir))), running(first), what="a checkpoint")
    refused_naming(config, first, capsys)
    first.send_signal(signal.SIGKILL)  # its lease stays behind, naming a process that has ended
    assert finish(first) == -signal.SIGKILL
    run(config, log=log)
    assert re.search(r"taking over the lease of .*: its holder has ended \(pid \d+", log.read_text())
    assert_bitwise(run_dir, straight)
    assert not (run_dir / LEASE_FILE).exists()  # released at the end


@pytest.mark.slow
def test_s3_second_writer_refused_and_a_sigkill_between_evaluations_loses_no_metrics(
        s3_bucket, tmp_path, data, straight, capsys):  # noqa: F811
    run_dir = f"{s3_bucket}/runs/lease"
    # No metrics flush on a timer: the records reach S3 at evaluations (every 5 steps) and at
    # commits (every 3), which is what a resume relies on.
    config = write_config(tmp_path / "config.yaml", data, run_dir, logging={"flush_every_s": 3600})
    log = tmp_path / "log.txt"
    first = start(config, "--step-delay", "0.2", log=log)
    wait_for(lambda: storage.exists(f"{run_dir}/{LEASE_FILE}"), running(first), what="the lease", every=0.2)
    refused_naming(config, first, capsys)
    # Killed after the commit of step 6, before the evaluation at step 10.
    wait_for(lambda: any(c.step == 6 for c in commits.committed(run_dir)), running(first), what="step 6", every=0.1)
    first.send_signal(signal.SIGKILL)
    assert finish(first) == -signal.SIGKILL
    assert max(r["step"] for r in read_metrics(run_dir)) >= 6  # flushed before the commit
    run(config, log=log)
    assert "resumed from" in log.read_text()
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, STEPS + 1))  # each once
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 5, 10, 15, 16]
    assert_bitwise(run_dir, straight)


@pytest.fixture(params=["local", "s3"])
def lease_dir(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path)
    return f"{request.getfixturevalue('s3_bucket')}/run"


def test_lease_of_a_silent_holder_elsewhere_is_taken_over_a_live_one_refuses_and_a_taken_lease_stops(lease_dir,
                                                                                                    caplog):
    url = storage.join(lease_dir, LEASE_FILE)

    def foreign(**changes) -> float:  # the lease as a process on another node writes it; its heartbeat
        record = {"owner": "other-node-run", "pid": 4242, "machine": {"host": "node-17"}, "job_id": "9001",
                  "acquired_at": "2030-01-01T00:00:00+00:00", "heartbeat": time.time(), "timeout_s": 1.0, **changes}
        storage.write_bytes_atomic(url, json.dumps(record).encode())
        return record["heartbeat"]

    heartbeat = foreign()
    lease = RunLease(lease_dir, timeout_s=1.0)
    lease.acquire()  # nobody renews it: taken over once a timeout has passed without a heartbeat
    # Counted from the heartbeat, not from acquire(): writing the record to S3 may take a while.
    assert 1.0 <= time.time() - heartbeat < 10
    assert "taking over the lease" in caplog.text and "pid 4242 on node-17, job 9001" in caplog.text
    foreign()  # another process takes the lease: the next renewal finds out, check() stops the run
    time.sleep(0.5)
    with pytest.raises(LeaseLostError, match="now held by pid 4242 on node-17"):
        lease.check()
    lease.release()
    assert json.loads(storage.read_bytes(url))["owner"] == "other-node-run"  # not ours: left alone

    stop = threading.Event()

    def heartbeat() -> None:  # that process renews its lease
        while not stop.wait(0.05):
            foreign()

    beating = threading.Thread(target=heartbeat)
    beating.start()
    try:
        with pytest.raises(RunDirectoryBusyError, match="pid 4242 on node-17, job 9001.*heartbeat advanced"):
            RunLease(lease_dir, timeout_s=1.0).acquire()
    finally:
        stop.set()
        beating.join()


# ---------------------------------------------------------------------------------------------
# Checksummed checkpoints.


@pytest.fixture(scope="module")
def straight_in_process(tmp_path_factory, data):  # noqa: F811
    losses, state, _, _ = train_in_process(run_config(tmp_path_factory.mktemp("straight-in-process"), data))
    return losses, state


def test_flipped_bytes_are_detected_resume_falls_back_export_refuses_and_a_lying_marker_is_damage(
        tmp_path, data, straight_in_process, capsys, caplog):  # noqa: F811
    run_dir = tmp_path / "run"
    config = run_config(run_dir, data)  # 10 steps, a checkpoint every 3, keep_last 2
    train_in_process(config, stop=7)  # checkpoints 6 and 7
    shard = run_dir / "checkpoints" / "step-7" / "__0_0.distcp"
    damaged = bytearray(shard.read_bytes())
    damaged[5000:5064] = bytes(b ^ 0xFF for b in damaged[5000:5064])  # 64 flipped bytes, same size
    shard.write_bytes(bytes(damaged))

    assert gptrain_main(["export", str(shard.parent), "--out", str(tmp_path / "exported")]) == 2
    assert "step-7/__0_0.distcp has sha256" in capsys.readouterr().err
    assert not (tmp_path / "exported").exists()
    assert gptrain_main(["export", str(shard.parent), "--out", str(tmp_path / "unchecked"), "--no-verify"]) == 0

    losses, state, resumed, _ = train_in_process(config)
    assert resumed.step == 6 and "step-7/__0_0.distcp has sha256" in resumed.skipped[0]
    straight_losses, straight_state = straight_in_process
    assert losses == straight_losses[6:]
    assert same_weights(state.model, straight_state.model)

    # A marker that agrees with its folder but not with the state saved in it.
    step10 = commits.step_url(str(run_dir), 10)
    shutil.copytree(step10, commits.step_url(str(run_dir), 12))
    marker = Path(commits.step_url(str(run_dir), 12)) / commits.MARKER_FILE
    marker.write_text(marker.read_text().replace('"step": 10', '"step": 12'))
    with caplog.at_level("WARNING"):
        _, state, resumed, _ = train_in_process(config)  # a resume at the end trains nothing more
    assert resumed.step == 10 and "the saved state is at step 10" in resumed.skipped[0]
    # A marker whose step is not its folder's: damaged, and retention neither trusts nor deletes it.
    marker.write_text(marker.read_text().replace('"step": 12', '"step": 1'))
    assert [c.step for c in commits.committed(str(run_dir))] == [9, 10]
    assert "says step 1 in folder step-12: the marker is damaged" in caplog.text
    commits.apply_retention(str(run_dir), keep_last=1, keep_every=0)
    assert [step for step, _ in commits.step_folders(str(run_dir))] == [10, 12]


# ---------------------------------------------------------------------------------------------
# Storage faults and full disks.


@pytest.fixture
def proxy(s3_server, monkeypatch):
    """The fault proxy in front of the moto server; this process and those it starts talk to it."""
    import s3fs

    proxy = FaultProxy(s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    s3fs.S3FileSystem.clear_instance_cache()  # instances keep the endpoint they were made with
    yield proxy
    s3fs.S3FileSystem.clear_instance_cache()
    proxy.close()


@pytest.mark.slow
def test_outage_ends_the_run_with_one_line_then_transient_faults_cost_nothing(
        s3_bucket, proxy, tmp_path, data, straight, monkeypatch):  # noqa: F811
    run_dir = f"{s3_bucket}/runs/faults"
    config = write_config(tmp_path / "config.yaml", data, run_dir)
    log = tmp_path / "log.txt"
    # An outage from the save of step 6 on, longer than the retries: 3 attempts here (the
    # default, 20, outlasts a minute; benchmarks/storage_faults.py shows both at full length).
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    outage = proxy.add(Fault("status", 3600, status=503, start_on=lambda m, p: checkpoint_write(m, p)
                             and "/step-6/" in p))
    proc = start(config, log=log)
    assert finish(proc) == 1
    (line,) = [line for line in log.read_text().splitlines() if line.startswith("gptrain train: ")]
    assert line.startswith(f"gptrain train: storage error: {run_dir}/checkpoints/step-6")
    assert "ServiceUnavailable" in line and outage.hits >= 3
    assert "Traceback" not in log.read_text()
    proxy.clear()  # storage is back
    assert [c.step for c in commits.committed(run_dir)] == [3]

    # Bursts of faults during the saves and metric writes of the rerun, which the default
    # retry budget absorbs.
    monkeypatch.delenv("AWS_MAX_ATTEMPTS")
    errors = proxy.add(Fault("status", 2, status=500, code="InternalError", start_on=checkpoint_write, only=writes))
    throttled = proxy.add(Fault("status", 2, status=503, code="SlowDown", only=writes,
                                start_on=lambda m, p: errors.over and writes(m, p) and p.endswith("metrics.jsonl")))
    dropped = proxy.add(Fault("drop", 1, start_on=lambda m, p: throttled.over and checkpoint_write(m, p)))
    slow = proxy.add(Fault("delay", 1, delay_s=0.3, start_on=lambda m, p: dropped.over))
    run(config, log=log)
    assert all(f.hits > 0 for f in (errors, throttled, dropped, slow)), [f.hits for f in (errors, throttled, dropped,
                                                                                          slow)]
    assert f"resumed from {run_dir}/checkpoints/step-3" in log.read_text()
    assert_bitwise(run_dir, straight)


@pytest.mark.slow
def test_full_disk_fails_the_save_naming_the_path_and_the_rerun_with_space_resumes(tmp_path, data, straight):  # noqa: F811
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = write_config(tmp_path / "config.yaml", data, str(run_dir))
    train = shlex.join([PYTHON, test_resume.__file__, "--", "train", "--config", str(config)])
    # A checkpoint takes 13 MB: the first fits in 20 MB, the second does not. The tmpfs lives in
    # a mount namespace of this script's own, so copies come out for the assertions.
    script = f"""
        mount -t tmpfs -o size=20m gptrain-test {run_dir}
        status=0; {train} > {tmp_path}/full.log 2>&1 || status=$?; echo $status > {tmp_path}/full.status
        cp -a {run_dir} {tmp_path}/after-full
        mount -o remount,size=256m {run_dir}
        status=0; {train} > {tmp_path}/rerun.log 2>&1 || status=$?; echo $status > {tmp_path}/rerun.status
        cp -a {run_dir} {tmp_path}/after-rerun
    """
    subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-ec", script], env=clean_env(),
                   check=True, timeout=300)
    full_log = (tmp_path / "full.log").read_text()
    assert (tmp_path / "full.status").read_text().strip() == "1", full_log[-3000:]
    (line,) = error_lines(full_log)
    assert line == (f"gptrain train: storage error: no space left on device: "
                    f"{run_dir}/checkpoints/step-6/__0_0.distcp (No space left on device)")
    (previous,) = commits.committed(str(tmp_path / "after-full"))
    assert previous.step == 3
    commits.verify(previous)
    load_model_from_checkpoint(previous.url)
    assert (tmp_path / "rerun.status").read_text().strip() == "0", (tmp_path / "rerun.log").read_text()[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step-3" in (tmp_path / "rerun.log").read_text()
    assert_bitwise(tmp_path / "after-rerun", straight)


# ---------------------------------------------------------------------------------------------
# Startup validation, the final save, kill trials.


def test_what_would_fail_late_is_refused_at_start_with_one_line(tmp_path, data, s3_server, capsys):  # noqa: F811
    base = ["train", "--config", "debug", f"data.path={data}"]
    assert gptrain_main([*base, f"train.run_dir={tmp_path / 'a'}", "model.context_length=100000"]) == 2
    assert "model.context_length=100000: must be <= 256, the longest context of model 'gpt2-tiny'" in (
        capsys.readouterr().err)

    raw_dir(tmp_path / "raw")
    no_val = tmp_path / "no-val"
    run_prepare(PrepareConfig(input=str(tmp_path / "raw"), out=str(no_val), workers=1, val_fraction=0.0))
    assert gptrain_main(["train", "--config", "debug", f"data.path={no_val}", f"train.run_dir={tmp_path / 'b'}"]) == 2
    assert "the validation split has 0 window(s) of 65 tokens" in capsys.readouterr().err

    (tmp_path / "file").write_text("not a folder")
    assert gptrain_main([*base, f"train.run_dir={tmp_path / 'file'}"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err

    assert gptrain_main([*base, "train.run_dir=s3://no-such-bucket-here/run"]) == 2
    assert f"bucket 'no-such-bucket-here' does not exist at {s3_server}" in capsys.readouterr().err

    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = subprocess.run(
        [PYTHON, "-m", "gptrain", *base, "train.run_dir=s3://bucket/run"],
        env=clean_env(AWS_ENDPOINT_URL=down, AWS_MAX_ATTEMPTS="2"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    (line,) = error_lines(result.stderr)
    assert line.startswith("gptrain train: storage error: s3://bucket/run: EndpointConnectionError")


def test_final_checkpoint_is_committed_before_the_final_evaluation(tmp_path, data, monkeypatch):  # noqa: F811
    run_dir = tmp_path / "run"
    steps = 6  # a checkpoint at step 3, evaluations at 0, 5 and the end
    config = load_config(str(write_config(tmp_path / "config.yaml", data, str(run_dir), train={"max_steps": steps})))
    evaluate = trainer_module.Trainer.evaluate

    def crash_at_the_end(self) -> None:
        if self.state.step == steps:
            raise RuntimeError("the final evaluation crashed")
        evaluate(self)

    monkeypatch.setattr(trainer_module.Trainer, "evaluate", crash_at_the_end)
    with pytest.raises(RuntimeError, match="final evaluation crashed"):
        trainer_module.train(config)
    assert commits.committed(str(run_dir))[-1].step == steps  # the training is kept
    monkeypatch.setattr(trainer_module.Trainer, "evaluate", evaluate)
    summary = trainer_module.train(config)  # resumes at the end: only evaluates
    assert summary["steps"] == steps
    records = read_metrics(str(run_dir))
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, steps + 1))
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 5, steps]


@pytest.mark.slow
def test_seeded_kill_trials_resume_bitwise_from_intact_checkpoints(tmp_path, data):  # noqa: F811
    result = run_trials("async", kills=2, seed=5, root=tmp_path, data=data)
    assert (result.kills, result.failed, result.non_bitwise, result.corrupt) == (2, 0, 0, 0)
    assert result.runs >= 1
