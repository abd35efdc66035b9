"""gptrain.checkpoint on its own: the commit protocol, retention, exact resume (sync and async),
damaged checkpoints, S3 (a real moto server), preemption signals and `gptrain export`.

The end-to-end runs of `gptrain train` (SIGTERM/SIGKILL, DDP, world-size changes) are in
test_resume.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time

import pytest
import torch

from checkpoint_fixtures import CONTEXT, build_state, prepare_dataset, run_config, same_weights, train_until
from gptrain import storage
from gptrain.checkpoint import commit as commits
from gptrain.checkpoint.checkpointer import Checkpointer
from gptrain.checkpoint.commit import CheckpointError
from gptrain.checkpoint.export import export, load_model_from_checkpoint
from gptrain.checkpoint.preemption import PreemptionHandler
from gptrain.checkpoint.store import ReusedCpuStaging
from gptrain.cli import main as gptrain_main
from gptrain.errors import GptrainError

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a small shared machine more threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_dataset(tmp_path_factory.mktemp("ckpt-data"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data):
    """The uninterrupted run every stopped-and-resumed run must reproduce: (losses, state)."""
    losses, state, _, _ = run(run_config(tmp_path_factory.mktemp("straight"), data))
    return losses, state


def run(config, stop: int | None = None, blocking_stop: bool = True):
    """Build fresh objects, resume as configured, train to `stop` (default: the end), save."""
    state, dataset = build_state(config)
    checkpointer = Checkpointer(config, dataset, CPU)
    resumed = checkpointer.resume(state)
    losses = train_until(state, checkpointer, stop or config.train.max_steps)
    checkpointer.save(state, blocking=blocking_stop)
    checkpointer.close()
    return losses, state, resumed, checkpointer


# ---------------------------------------------------------------------------------------------
# Commit markers, listing, retention.


def test_commit_marker_records_files_sizes_and_checksums_and_verify_names_a_damaged_file(tmp_path):
    url = commits.step_url(str(tmp_path), 7)
    os.makedirs(url)
    (tmp_path / "checkpoints" / "step-7" / "__0_0.distcp").write_bytes(b"x" * 100)
    (tmp_path / "checkpoints" / "step-7" / ".metadata").write_bytes(b"m" * 10)
    with pytest.raises(CheckpointError, match=r"step-7/commit.json is missing"):
        commits.read_commit(url)
    # The shard's digest comes from its writer; the metadata is hashed at commit time.
    shard = commits.FileRecord(100, hashlib.sha256(b"x" * 100).hexdigest())
    written = commits.write_commit(url, 7, world_size=2, written={"__0_0.distcp": shard})
    marker = json.loads((tmp_path / "checkpoints" / "step-7" / "commit.json").read_text())
    assert marker["files"] == {"__0_0.distcp": {"size": 100, "sha256": shard.sha256},
                               ".metadata": {"size": 10, "sha256": hashlib.sha256(b"m" * 10).hexdigest()}}
    assert (marker["step"], marker["world_size"]) == (7, 2)
    assert commits.read_commit(url) == written
    commits.verify(written)

    (tmp_path / "checkpoints" / "step-7" / "__0_0.distcp").write_bytes(b"x" * 99 + b"y")  # same size
    commits.verify(written, checksums=False)
    with pytest.raises(CheckpointError, match=r"step-7/__0_0.distcp has sha256 .* but .*commit.json recorded"):
        commits.verify(written)
    (tmp_path / "checkpoints" / "step-7" / "__0_0.distcp").write_bytes(b"x" * 60)
    with pytest.raises(CheckpointError, match=r"step-7/__0_0.distcp has 60 bytes but .*commit.json recorded 100"):
        commits.verify(written)
    os.remove(tmp_path / "checkpoints" / "step-7" / ".metadata")
    with pytest.raises(CheckpointError, match=r"step-7/\.metadata is missing"):
        commits.verify(written)
    (tmp_path / "checkpoints" / "step-7" / "commit.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"step-7/commit.json is not a valid commit marker"):
        commits.read_commit(url)


def test_retention_keeps_the_last_k_and_every_mth_and_cleans_uncommitted(tmp_path):
    assert commits.retained_steps([100, 200, 300, 400, 500, 600], keep_last=2, keep_every=0) == {500, 600}
    assert commits.retained_steps([100, 200, 300, 400, 500, 600], keep_last=2, keep_every=200) == {200, 400, 500, 600}
    run_dir = str(tmp_path)
    for step in (100, 200, 300, 400, 500):
        os.makedirs(commits.step_url(run_dir, step))
        commits.write_commit(commits.step_url(run_dir, step), step, 1, written={})
    os.makedirs(commits.step_url(run_dir, 550))  # a save that died before its marker
    assert [c.step for c in commits.committed(run_dir)] == [100, 200, 300, 400, 500]
    assert commits.remove_uncommitted(run_dir, below_step=500) == []
    assert commits.remove_uncommitted(run_dir) == [commits.step_url(run_dir, 550)]
    commits.apply_retention(run_dir, keep_last=2, keep_every=200)
    assert [step for step, _ in commits.step_folders(run_dir)] == [200, 400, 500]


# ---------------------------------------------------------------------------------------------
# Exact resume.


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_stop_and_resume_reproduces_every_loss_and_the_final_weights(tmp_path, data, straight, async_save):
    straight_losses, straight = straight
    config = run_config(tmp_path / "stopped", data, async_save=async_save)
    first, _, resumed, _ = run(config, stop=5)
    assert resumed is None
    second, state, resumed, checkpointer = run(config)
    assert (resumed.step, resumed.tokens_seen, resumed.saved_world_size) == (5, 5 * 2 * CONTEXT, 1)
    assert first + second == straight_losses  # dropout included: the RNG streams were restored
    assert same_weights(state.model, straight.model)
    assert state.loader.state_dict() == straight.loader.state_dict()
    steps = [step for step, _ in commits.step_folders(str(tmp_path / "stopped"))]
    assert steps == [9, 10]  # keep_last=2
    report = checkpointer.reports[0]
    assert report.asynchronous == async_save and report.total_s >= report.stall_s > 0


def test_async_save_writes_the_state_of_the_moment_it_was_called(tmp_path, data, monkeypatch):
    config = run_config(tmp_path / "run", data, async_save=True, every=0)
    state, dataset = build_state(config)
    checkpointer = Checkpointer(config, dataset, CPU)
    train_until(state, checkpointer, 2)
    expected = {k: v.clone() for k, v in state.model.state_dict().items()}
    moments = {k: v.clone() for k, v in state.optimizer.state_dict()["state"][0].items()}
    copy = ReusedCpuStaging.copy

    def slow_copy(self, state_dict):
        time.sleep(1.0)  # a copy slower than the next forward and backward
        return copy(self, state_dict)

    monkeypatch.setattr(ReusedCpuStaging, "copy", slow_copy)
    report = checkpointer.save(state)  # returns before the copy; the write goes on in the background
    stall_in_save = report.stall_s
    assert stall_in_save < 1.0
    train_until(state, checkpointer, 4)  # the first optimizer step waits for the copy: a stall
    assert report.stall_s > stall_in_save
    checkpointer.close()
    assert checkpointer.finished_saves() == [report] and report.total_s >= report.stall_s
    assert report.copy_s >= 1.0 and report.metrics_record() | {"stall_s": 0, "write_s": 0, "copy_s": 0} == {
        "kind": "checkpoint", "step": 2, "async": True, "stall_s": 0, "write_s": 0, "copy_s": 0, "url": report.url}
    saved = load_model_from_checkpoint(str(tmp_path / "run"))
    assert all(torch.equal(saved.state_dict()[k], v) for k, v in expected.items())
    resumed_state, _ = build_state(config)
    Checkpointer(config, dataset, CPU).resume(resumed_state)
    assert resumed_state.step == 2
    assert all(torch.equal(resumed_state.optimizer.state_dict()["state"][0][k], v) for k, v in moments.items())


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints.


def test_truncated_shard_is_named_and_auto_resume_falls_back_to_the_previous(tmp_path, data, caplog):
    config = run_config(tmp_path / "run", data)
    run(config, stop=6)  # commits step 3 and step 6
    shard = tmp_path / "run" / "checkpoints" / "step-6" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])

    explicit = run_config(tmp_path / "run", data, resume=str(tmp_path / "run" / "checkpoints" / "step-6"))
    state, dataset = build_state(explicit)
    with pytest.raises(CheckpointError, match=r"step-6/__0_0.distcp has 1000 bytes but .* recorded"):
        Checkpointer(explicit, dataset, CPU).resume(state)

    caplog.set_level(logging.INFO, logger="gptrain.checkpoint")
    state, dataset = build_state(config)
    checkpointer = Checkpointer(config, dataset, CPU)
    resumed = checkpointer.resume(state)
    assert resumed.step == 3 and len(resumed.skipped) == 1
    assert "cannot resume from" in caplog.text and "step-6/__0_0.distcp has 1000 bytes" in caplog.text
    assert "falling back to the previous committed checkpoint" in caplog.text
    # Training on replaces the damaged step-6 with a good one.
    train_until(state, checkpointer, 6)
    checkpointer.close()
    commits.verify(commits.read_commit(str(tmp_path / "run" / "checkpoints" / "step-6")))


def test_missing_marker_is_not_a_checkpoint(tmp_path, data):
    config = run_config(tmp_path / "run", data)
    run(config, stop=3)
    os.remove(tmp_path / "run" / "checkpoints" / "step-3" / "commit.json")  # as if rank 0 died before it
    folder = str(tmp_path / "run" / "checkpoints" / "step-3")
    explicit = run_config(tmp_path / "run", data, resume=folder)
    state, dataset = build_state(explicit)
    with pytest.raises(CheckpointError, match=r"step-3/commit.json is missing: .* was never committed"):
        Checkpointer(explicit, dataset, CPU).resume(state)  # nothing deleted: explicit resumes only read
    state, dataset = build_state(config)
    checkpointer = Checkpointer(config, dataset, CPU)  # rank 0 cleans up uncommitted folders
    assert not os.path.exists(folder)
    assert checkpointer.resume(state) is None and state.step == 0


def test_checkpoint_of_another_model_names_its_config_and_no_fallback_hides_it(tmp_path, data):
    run(run_config(tmp_path / "run", data), stop=3)
    wider = run_config(tmp_path / "run", data).to_dict()
    wider["model"]["d_model"], wider["model"]["d_ff"] = 64, 128
    from gptrain.config import RunConfig

    config = RunConfig.from_dict(wider)
    state, dataset = build_state(config)
    with pytest.raises(CheckpointError) as err:
        Checkpointer(config, dataset, CPU).resume(state)
    message = str(err.value)
    assert "no committed checkpoint can be loaded" in message
    assert "step-3/config.yaml describes a different model than this run's (d_model: checkpoint 16, this run 64" in message

    (tmp_path / "run" / "checkpoints" / "step-3" / "config.yaml").write_text("model: [broken")
    config = run_config(tmp_path / "run", data, resume=str(tmp_path / "run" / "checkpoints" / "step-3"))
    state, dataset = build_state(config)
    with pytest.raises(CheckpointError, match=r"step-3/config.yaml (has|is)"):
        Checkpointer(config, dataset, CPU).resume(state)


# ---------------------------------------------------------------------------------------------
# Object storage.


def test_s3_run_directory_saves_resumes_exactly_and_applies_retention(s3_bucket, data, straight):
    straight_losses, straight = straight
    config = run_config(f"{s3_bucket}/runs/a", data, async_save=True)
    first, _, _, _ = run(config, stop=5)
    fs, path = storage.filesystem(f"{s3_bucket}/runs/a/checkpoints/step-7")
    fs.pipe(f"{path}/__0_0.distcp", b"partial")  # a save that died on S3: no marker
    second, state, resumed, _ = run(config)
    assert resumed.step == 5
    assert first + second == straight_losses and same_weights(state.model, straight.model)
    assert [c.step for c in commits.committed(f"{s3_bucket}/runs/a")] == [9, 10]
    assert [step for step, _ in commits.step_folders(f"{s3_bucket}/runs/a")] == [9, 10]
    exported = load_model_from_checkpoint(f"{s3_bucket}/runs/a")
    assert same_weights(exported, straight.model)


# ---------------------------------------------------------------------------------------------
# Preemption signals.


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2])
def test_preemption_signal_only_sets_a_flag_until_the_ranks_agree(signum):
    before = signal.getsignal(signum)
    with PreemptionHandler(CPU) as handler:
        assert handler.agree() is None
        os.kill(os.getpid(), signum)  # delivered to this (the main) thread before kill returns
        preemption = handler.agree()
        assert preemption.signals == (signum,)
        assert 0 <= preemption.seconds_since_signal() < 5
    assert signal.getsignal(signum) == before


# ---------------------------------------------------------------------------------------------
# Export.


def test_export_loads_in_transformers_with_the_same_logits_and_in_gptrain(tmp_path, data, capsys):
    from transformers import AutoModelForCausalLM

    from gptrain.models.weights import load_pretrained

    _, state, _, _ = run(run_config(tmp_path / "run", data), stop=4)
    assert gptrain_main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert "step 4" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "gptrain_tokenizer.json", "model.safetensors"]
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    model = state.model.eval()
    tokens = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(tokens).logits, model(tokens), atol=1e-5)
        assert torch.equal(load_pretrained(str(tmp_path / "hf"))(tokens), model(tokens))
        assert torch.equal(load_pretrained(str(tmp_path / "run"))(tokens), model(tokens))  # a run directory
    assert gptrain_main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err


def test_export_of_a_run_without_checkpoints_is_an_error(tmp_path, capsys):
    os.makedirs(tmp_path / "run" / "checkpoints")
    assert gptrain_main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    assert "has no committed checkpoint" in capsys.readouterr().err
    with pytest.raises(GptrainError, match="was never committed"):
        export(str(tmp_path / "nothing-here"), str(tmp_path / "hf"))
