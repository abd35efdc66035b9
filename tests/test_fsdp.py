"""train.parallelism=fsdp (FSDP2 over gloo, real torchrun ranks) against ddp, end to end.

* Parity: a small GPT-2 (tied head, dropout) and a small Llama (GQA), 20 steps on 4 and on 2
  ranks, fsdp against ddp on the same data and seed: every logged loss within 1e-5 relative,
  final weights within 1e-5; with accumulation, HSDP (2 x 2) and activation checkpointing
  (selective; full, which on 2 ranks gives ddp's losses and weights to the last bit).
* Memory: every rank holds exactly the parameter, gradient and AdamW bytes `gptrain plan`
  states (1/N of ddp's, rounded up per tensor), and each rank's checkpoint file holds only
  its own rows of every tensor.
* Resume: fsdp on 4 ranks stopped by SIGTERM, resumed on 4 and SIGKILLed mid-save (every
  logged loss and the weights so far bitwise equal to an uninterrupted run), resumed on 2
  ranks, stopped again, and finished on 1 rank with ddp: every training window exactly once.
* `gptrain export` of fsdp checkpoints: `transformers` gives gptrain's logits.

Run as a script, this file is the ranks' worker: one process group trains each config in
turn (one torchrun start for several runs), then writes this rank's bytes of parameters,
gradients and optimizer state into the run directory:

    torchrun --nproc-per-node=N tests/test_fsdp.py CONFIG...
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

STATE_BYTES = "state-bytes.rank{}.json"


def local_bytes(tensor) -> int:
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def worker_main(configs: list[str]) -> int:
    from gptrain.config import load_config
    from gptrain.distributed import destroy_distributed, init_distributed
    from gptrain.train.trainer import Trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    env = init_distributed("cpu", init_timeout_s=120, timeout_s=300)
    try:
        for path in configs:
            trainer = Trainer(load_config(path), env)
            trainer.fit()
            state = trainer.state
            trainer.forward_backward()  # gradients to count (fit ends with them freed)
            params = list({id(p): p for p in state.model.parameters()}.values())
            held = {
                "parameters": sum(local_bytes(p) for p in params),
                "gradients": sum(local_bytes(p.grad) for p in params),
                "optimizer": sum(local_bytes(s[k]) for s in state.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")),
            }
            Path(trainer.config.train.run_dir, STATE_BYTES.format(env.rank)).write_text(json.dumps(held))
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))


# ---------------------------------------------------------------------------------------------
# The tests.

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from checkpoint_fixtures import TINY_MODEL, same_weights  # noqa: E402
from conftest import clean_env, run_to_completion, stop_session  # noqa: E402
from gptrain.checkpoint import commit as commits  # noqa: E402
from gptrain.checkpoint.export import export, load_model_from_checkpoint  # noqa: E402
from gptrain.config import load_config  # noqa: E402
from gptrain.data.loader import TokenDataset, TokenLoader  # noqa: E402
from gptrain.train.logger import read_metrics  # noqa: E402
from gptrain.train.plan import plan_memory  # noqa: E402
from test_resume import (  # noqa: E402,F401 (stop_leftover_processes: the autouse fixture stopping start()'s processes)
    finish,
    running,
    start,
    stop_leftover_processes,
    train_records,
    wait_for,
    write_config,
)
from train_fixtures import gutenberg_dataset  # noqa: E402,F401 (a fixture)

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
STEPS = 20
TINY_LLAMA = {"name": "llama-tiny", "context_length": 32, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64}


def parity_config(folder: Path, name: str, data: str, model: dict, **train) -> Path:
    config = {
        "model": model,
        "data": {"path": data},
        "optim": {"lr": 3e-3, "fused": False},
        "schedule": {"warmup_steps": 5},
        "train": {"run_dir": str(folder / name), "max_steps": STEPS, "micro_batch_size": 2, "device": "cpu",
                  "dtype": "fp32", "log_every": 1, **train},
        # Evaluations and text samples run as collectives under fsdp: keep them in the runs.
        "eval": {"every": 10, "max_windows": 8, "sample_max_new_tokens": 4},
        "checkpoint": {"every": 0},
        "logging": {"plot": False},
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def torchrun(ranks: int, *args: str, log: Path) -> list[str]:
    """torchrun in a network namespace that has only loopback (its store listens on all interfaces)."""
    command = [TORCHRUN, "--standalone", f"--nproc-per-node={ranks}", *args]
    return ["unshare", "--net", "bash", "-c", f"ip link set lo up && exec {shlex.join(command)} >>{log} 2>&1"]


PARITY = {  # name: (model, train overrides of the fsdp run), compared with ddp_run(name)
    "gpt2": (TINY_MODEL, {}),
    "llama-accum-hsdp-selective": (TINY_LLAMA, {"grad_accum_steps": 2, "fsdp_shard_size": 2,
                                                "activation_checkpointing": "selective"}),
}
PARITY_2 = {
    "gpt2-accum-selective": (TINY_MODEL, {"grad_accum_steps": 2, "activation_checkpointing": "selective"}),
    "llama-full": (TINY_LLAMA, {"activation_checkpointing": "full"}),
}
CHAIN_WINDOWS = 96  # of about 5,000 in the training split: one epoch, every window id distinct


def chain_config(folder: Path, name: str, data: str, parallelism: str = "fsdp") -> Path:
    """The resume chain's config (test_resume's tiny model), stopping at CHAIN_WINDOWS windows
    whatever the number of ranks; every even step's checkpoint is kept."""
    train = {"parallelism": parallelism, "max_steps": None, "max_tokens": CHAIN_WINDOWS * 32, "grad_accum_steps": 1}
    return write_config(folder / f"{name}.json", Path(data), str(folder / name), train=train,
                        checkpoint={"every": 2, "keep_every": 2})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, gutenberg_dataset) -> Path:  # noqa: F811
    """All parity runs (one torchrun start per world size) and the resume chain's
    uninterrupted reference run ("straight", on 4 ranks)."""
    root = tmp_path_factory.mktemp("fsdp")
    log = root / "log.txt"
    for ranks, pairs in ((4, PARITY), (2, PARITY_2)):
        configs, ddp_runs = [], set()
        for name, (model, train) in pairs.items():
            configs.append(parity_config(root, f"{name}-{ranks}", gutenberg_dataset, model, parallelism="fsdp", **train))
            ddp_name = ddp_run(name, ranks)
            if ddp_name not in ddp_runs:
                ddp_runs.add(ddp_name)
                ddp_train = {k: v for k, v in train.items() if k != "fsdp_shard_size" and v != "full"}
                configs.append(parity_config(root, ddp_name, gutenberg_dataset, model, **ddp_train))
        if ranks == 4:
            configs.append(chain_config(root, "straight", gutenberg_dataset))
        run_to_completion(torchrun(ranks, __file__, *map(str, configs), log=log), timeout=600, env=clean_env())
    return root


def ddp_run(name: str, ranks: int) -> str:
    """The ddp run an fsdp run is compared with: the same settings, without full checkpointing
    (which must change nothing)."""
    return f"{name.replace('-full', '')}-{ranks}-ddp"


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(str(run_dir)) if r["kind"] == "train"]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_model_from_checkpoint(str(run_dir)).state_dict()


@pytest.mark.slow
def test_fsdp_trains_like_ddp_and_holds_one_nth_of_the_state(runs):
    report = []
    for ranks, pairs in ((4, PARITY), (2, PARITY_2)):
        for name in pairs:
            fsdp_dir = runs / f"{name}-{ranks}"
            ddp_dir = runs / ddp_run(name, ranks)
            fsdp_losses, ddp_losses = losses(fsdp_dir), losses(ddp_dir)
            assert len(fsdp_losses) == len(ddp_losses) == STEPS
            loss_diff = max(abs(a - b) / abs(b) for a, b in zip(fsdp_losses, ddp_losses))
            fsdp_weights, ddp_weights = final_weights(fsdp_dir), final_weights(ddp_dir)
            weight_diff = max((fsdp_weights[k] - ddp_weights[k]).abs().max().item() for k in ddp_weights)
            report.append(f"{name} on {ranks} ranks: losses {loss_diff:.1e} relative, weights {weight_diff:.1e}")
            assert loss_diff <= 1e-5 and weight_diff <= 1e-5, report[-1]
            assert ddp_losses[-1] < ddp_losses[0] - 0.3  # it learned: the comparison means something
    print("\n".join(report))
    # On 2 ranks (one addition per gradient element, whatever the layout) fsdp with full
    # checkpointing, which recomputes the blocks with the forward's RNG state, is ddp without it
    # to the last bit.
    assert losses(runs / "llama-full-2") == losses(runs / "llama-2-ddp")
    assert same_weights(load_model_from_checkpoint(str(runs / "llama-full-2")),
                        load_model_from_checkpoint(str(runs / "llama-2-ddp")))

    # Each rank holds the bytes the plan states: fsdp 1/N of ddp (per tensor, rounded up).
    for name, ranks in (("gpt2-4", 4), ("gpt2-4-ddp", 4), ("llama-accum-hsdp-selective-4", 4), ("llama-full-2", 2)):
        plan = plan_memory(load_config(str(runs / f"{name}.json")), ranks, "cpu")
        held = [json.loads((runs / name / STATE_BYTES.format(r)).read_text()) for r in range(ranks)]
        assert max(h["parameters"] for h in held) == plan.parameters, name
        assert max(h["gradients"] for h in held) == plan.gradients, name
        assert max(h["optimizer"] for h in held) == plan.optimizer, name
    ddp_params = plan_memory(load_config(str(runs / "gpt2-4-ddp.json")), 4, "cpu").parameters
    fsdp_params = plan_memory(load_config(str(runs / "gpt2-4.json")), 4, "cpu").parameters
    assert ddp_params / 4 <= fsdp_params < ddp_params / 4 * 1.01
    hsdp = plan_memory(load_config(str(runs / "llama-accum-hsdp-selective-4.json")), 4, "cpu").parameters
    assert hsdp == plan_memory(load_config(str(runs / "llama-full-2.json")), 2, "cpu").parameters  # sharded over 2


@pytest.mark.slow
def test_each_fsdp_rank_writes_only_its_own_rows(runs):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for name, sharded in (("gpt2-4", True), ("gpt2-4-ddp", False)):
        url = commits.committed(str(runs / name))[-1].url
        metadata = FileSystemReader(url).read_metadata()
        files_per_tensor = {}
        for index, info in metadata.storage_data.items():
            item = metadata.state_dict_metadata[index.fqn]
            if not isinstance(item, TensorStorageMetadata) or len(item.size) < 2:
                continue
            rows = item.size[0]
            files_per_tensor.setdefault(index.fqn, set()).add(info.relative_path)
            if sharded:  # rank r's file holds rows [r * rows/4, (r+1) * rows/4) and nothing else
                assert info.relative_path == f"__{index.offset[0] * 4 // rows}_0.distcp", index
        counts = {len(files) for files in files_per_tensor.values()}
        assert counts == ({4} if sharded else {1}), (name, counts)  # ddp: each tensor whole, in one file
        sizes = [(Path(url) / f"__{rank}_0.distcp").stat().st_size for rank in range(4)]
        print(f"{name}: bytes in each rank's file {sizes}")
        if sharded:
            assert max(sizes) < 1.01 * min(sizes)


def _kill_ranks(torchrun_proc: subprocess.Popen) -> None:
    """SIGKILL every rank at once (a lost node), then torchrun."""
    children = []
    for task in Path(f"/proc/{torchrun_proc.pid}/task").iterdir():
        children += (task / "children").read_text().split()
    assert len(children) == 4, children
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    stop_session(torchrun_proc)


def _windows(prefix: Path, keep_steps: int | None = None) -> list[int]:
    """Window ids the ranks trained on (one line per step per rank); `keep_steps`: only the
    first ones (a killed launch's steps after its last commit are trained again)."""
    ids = []
    for path in sorted(prefix.parent.glob(f"{prefix.name}.rank*")):
        lines = path.read_text().splitlines()[:keep_steps]
        ids += [i for line in lines for i in json.loads(line)]
    return ids


@pytest.mark.slow
def test_fsdp_resumes_bitwise_after_sigterm_and_sigkill_then_on_fewer_ranks_and_ddp(runs, tmp_path, gutenberg_dataset):  # noqa: F811
    straight, run_dir, log = runs / "straight", tmp_path / "chain", tmp_path / "log.txt"
    config = chain_config(tmp_path, "chain", gutenberg_dataset)

    # 4 ranks, SIGTERM: the ranks agree on a step, save and exit 75.
    proc = start(config, "--step-delay", "0.05", "--windows", str(tmp_path / "w1"), ranks=4, log=log)
    wait_for(lambda: any(r["step"] >= 3 for r in train_records(run_dir)), running(proc), what="step 3")
    proc.send_signal(signal.SIGTERM)  # to torchrun, which passes it on to the ranks (and exits 1 itself)
    finish(proc)
    first_stop = commits.committed(str(run_dir))[-1].step
    assert f"preempted by SIGTERM at step {first_stop}" in log.read_text()

    # 4 ranks again, SIGKILLed while writing a checkpoint (after committing one of its own).
    proc = start(config, "--save-delay", "0.5", "--windows", str(tmp_path / "w2"), ranks=4, log=log)
    wait_for(lambda: commits.committed(str(run_dir))[-1].step > first_stop, running(proc), what="a commit")
    newest = commits.committed(str(run_dir))[-1].step
    in_save = lambda: any(step > newest for step, _ in commits.step_folders(str(run_dir)))  # noqa: E731
    wait_for(in_save, running(proc), what="a save in progress")
    _kill_ranks(proc)
    killed_at = commits.committed(str(run_dir))[-1].step
    assert killed_at == newest and newest % 2 == 0
    # Same world size: what the resumed ranks did is what the uninterrupted run did, bit for bit.
    straight_records = {r["step"]: r for r in train_records(straight)}
    resumed_records = train_records(run_dir)
    assert len(resumed_records) >= killed_at
    assert all(r == straight_records[r["step"]] for r in resumed_records)
    assert same_weights(load_model_from_checkpoint(str(commits.step_url(str(run_dir), killed_at))),
                        load_model_from_checkpoint(str(commits.step_url(str(straight), killed_at))))

    # 2 ranks (fsdp) resume the 4-rank checkpoint; SIGTERM again; 1 rank (ddp) finishes.
    proc = start(config, "--step-delay", "0.05", "--windows", str(tmp_path / "w3"), ranks=2, log=log)
    wait_for(lambda: commits.committed(str(run_dir))[-1].step >= killed_at + 3, running(proc), what="3 more steps")
    proc.send_signal(signal.SIGTERM)
    finish(proc)
    second_stop = commits.committed(str(run_dir))[-1].step
    assert f"preempted by SIGTERM at step {second_stop}" in log.read_text()
    ddp = chain_config(tmp_path, "chain", gutenberg_dataset, parallelism="ddp")
    proc = start(ddp, "--windows", str(tmp_path / "w4"), log=log)
    assert finish(proc) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "resuming a 4-rank checkpoint with 2 rank(s)" in text and "resuming a 2-rank checkpoint with 1 rank(s)" in text

    # Every window of the data order exactly once, whatever ran it.
    trained = (_windows(tmp_path / "w1") + _windows(tmp_path / "w2", keep_steps=killed_at - first_stop)
               + _windows(tmp_path / "w3") + _windows(tmp_path / "w4"))
    order = TokenLoader(TokenDataset(gutenberg_dataset), 32, 1, seed=123).window_ids(np.arange(CHAIN_WINDOWS))
    assert sorted(trained) == sorted(order.tolist())
    records = train_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    assert records[-1]["tokens_seen"] == CHAIN_WINDOWS * 32
    # The losses go on from where they were: the validation loss falls at every evaluation,
    # across the resumes on 4, 2 and 1 ranks.
    val_losses = [r["val_loss"] for r in read_metrics(str(run_dir)) if r["kind"] == "eval"]
    assert len(val_losses) >= 5 and all(b < a for a, b in zip(val_losses, val_losses[1:])), val_losses


@pytest.mark.slow
def test_export_of_fsdp_checkpoints_loads_in_transformers_with_gptrains_logits(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    for name, hf_class in (("gpt2-4", "GPT2LMHeadModel"), ("llama-accum-hsdp-selective-4", "LlamaForCausalLM")):
        out = tmp_path / name
        export(str(runs / name), str(out))
        hf = AutoModelForCausalLM.from_pretrained(out).eval()
        assert type(hf).__name__ == hf_class
        model = load_model_from_checkpoint(str(runs / name))
        tokens = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours, theirs = model(tokens), hf(tokens).logits
        diff = (ours - theirs).abs().max().item()
        print(f"{name}: export logits differ by at most {diff:.1e}")
        assert diff <= 1e-5
