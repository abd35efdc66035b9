"""DDP on CPU: two gloo ranks under torchrun train exactly like one process that accumulates
the same two micro-batches, and only rank 0 writes the run directory."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import pytest

from conftest import run_to_completion
from gptrain.checkpoint.export import load_model_from_checkpoint
from train_fixtures import gutenberg_dataset  # noqa: F401 (a fixture)

VENV_BIN = Path(sys.executable).parent
STEPS, EVERY = 6, 3
COMMON = [
    f"train.max_steps={STEPS}", "schedule.warmup_steps=2", "train.micro_batch_size=4", "train.log_every=1",
    f"eval.every={EVERY}", "eval.max_windows=8", "eval.sample_max_new_tokens=0", "logging.plot=false",
]


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_two_accumulation_steps(tmp_path, gutenberg_dataset):  # noqa: F811
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    data = f"data.path={gutenberg_dataset}"
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    run_to_completion(
        [sys.executable, "-m", "gptrain", "train", "--config", "debug", data, f"train.run_dir={single_dir}",
         "train.grad_accum_steps=2", *COMMON],
        timeout=300, env=env,
    )
    # torchrun's rendezvous store listens on all interfaces: run it in a private network
    # namespace that has only loopback.
    torchrun = [
        str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "-m", "gptrain", "train",
        "--config", "debug", data, f"train.run_dir={ddp_dir}", "train.grad_accum_steps=1", *COMMON,
    ]
    run_to_completion(
        ["unshare", "--net", "bash", "-c", "ip link set lo up && exec " + shlex.join(torchrun)], timeout=300, env=env,
    )

    # The final checkpoint of each run (the trainer commits one at the end).
    single = load_model_from_checkpoint(str(single_dir)).state_dict()
    ddp = load_model_from_checkpoint(str(ddp_dir)).state_dict()
    assert single.keys() == ddp.keys()
    max_diff = max((single[k] - ddp[k]).abs().max().item() for k in single)
    assert max_diff <= 1e-5, f"parameters differ by up to {max_diff}"

    # Metrics are all-reduced: the same loss, tokens and validation loss as the single process.
    single_train, ddp_train = _records(single_dir, "train"), _records(ddp_dir, "train")
    assert [r["step"] for r in ddp_train] == list(range(1, STEPS + 1))  # written once: by rank 0 only
    assert [r["tokens_seen"] for r in ddp_train] == [r["tokens_seen"] for r in single_train]
    for a, b in zip(single_train, ddp_train):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["lr"] == a["lr"]
    assert single_train[-1]["loss"] < single_train[0]["loss"] - 0.5  # it trained: the comparison means something
    single_eval, ddp_eval = _records(single_dir, "eval"), _records(ddp_dir, "eval")
    assert [r["step"] for r in ddp_eval] == [0, EVERY, STEPS]
    for a, b in zip(single_eval, ddp_eval):
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-5)
    files = ["checkpoints", "config.yaml", "lease.json.lock", "metrics.jsonl"]  # lease.json: released at the end
    assert sorted(p.name for p in ddp_dir.iterdir()) == files
