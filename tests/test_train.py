"""The trainer end to end on real books: it learns, follows the schedule, writes its run
directory, and refuses bad configs before training."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from gptrain.cli import main as gptrain_main
from gptrain.config import RunConfig, load_config
from gptrain.distributed import DistEnv
from gptrain.errors import GptrainError
from gptrain.models import Transformer, get_model_config
from gptrain.train.logger import MetricsLogger
from gptrain.train.metrics import PeakFlops, gpu_peak_flops, mfu
from gptrain.train.optim import build_optimizer, split_parameters
from gptrain.train.trainer import Trainer
from train_fixtures import gutenberg_dataset  # noqa: F401 (a fixture)

# A short run of the debug preset: warm up 10 steps to 3e-3, cosine down to 3e-4 at step 120.
STEPS, WARMUP, PEAK, FLOOR, START = 120, 10, 3e-3, 3e-4, 3e-4
BATCH, CONTEXT = 4, 64
PROMPT = "Every effort moves you"


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _config(dataset: str, run_dir: Path, *overrides: str) -> RunConfig:
    return load_config("debug", [f"data.path={dataset}", f"train.run_dir={run_dir}", *overrides])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, gutenberg_dataset):  # noqa: F811
    """One real training run through the CLI, shared by the tests that inspect it."""
    run_dir = tmp_path_factory.mktemp("train") / "run"
    status = gptrain_main([
        "train", "--config", "debug", f"data.path={gutenberg_dataset}", f"train.run_dir={run_dir}",
        f"train.max_steps={STEPS}", f"schedule.warmup_steps={WARMUP}", f"schedule.initial_lr={START}",
        f"optim.lr={PEAK}", f"schedule.min_lr={FLOOR}", f"train.micro_batch_size={BATCH}",
        f"model.context_length={CONTEXT}", "train.log_every=1", "eval.every=40",
        "eval.max_windows=64", f"eval.sample_prompt={PROMPT}", "checkpoint.async_save=true",
    ])
    assert status == 0
    return run_dir


@pytest.mark.slow
def test_training_lowers_validation_loss_well_below_its_start(trained_run):
    evals = [r for r in _records(trained_run) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 40, 80, 120]
    first, last = evals[0]["val_loss"], evals[-1]["val_loss"]
    # An untrained model is near-uniform over the 50,257 tokens: loss ln(50257) = 10.8.
    assert first == pytest.approx(math.log(50257), abs=0.1)
    assert last < first - 3.0, f"validation loss {first:.3f} -> {last:.3f}"
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-9) for r in evals)
    assert all(r["sample"].startswith(PROMPT) and len(r["sample"]) > len(PROMPT) for r in evals)


@pytest.mark.slow
def test_run_directory_holds_config_metrics_and_plot(trained_run):
    config = RunConfig.from_dict(yaml.safe_load((trained_run / "config.yaml").read_text()))
    assert config.train.max_steps == STEPS and config.train.run_dir == str(trained_run)
    train = [r for r in _records(trained_run) if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["tokens_seen"] for r in train] == [BATCH * CONTEXT * step for step in range(1, STEPS + 1)]
    for record in train:
        assert math.isfinite(record["loss"]) and record["grad_norm"] > 0 and record["tokens_per_s"] > 0
        assert record["mfu"] is None  # no CPU peak in the table: reported as n/a, not guessed
        assert record["peak_memory_gib"] > 0
    # The periodic save (checkpoint.every=100) is async, the final one synchronous; each is
    # recorded once committed, with how long training stalled for it.
    saves = [r for r in _records(trained_run) if r["kind"] == "checkpoint"]
    assert [(r["step"], r["async"]) for r in saves] == [(100, True), (120, False)]
    assert all(r["write_s"] > 0 and r["stall_s"] > 0 and r["url"].endswith(f"step-{r['step']}") for r in saves)
    assert saves[1]["stall_s"] == saves[1]["write_s"]  # a synchronous save stalls for all of it
    png = (trained_run / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


@pytest.mark.slow
def test_learning_rates_follow_warmup_then_cosine(trained_run):
    """The record of step s holds the rate its update used: that of 0-based step s - 1."""
    lr = {r["step"] - 1: r["lr"] for r in _records(trained_run) if r["kind"] == "train"}

    def cosine(step: int) -> float:
        progress = (step - WARMUP) / (STEPS - WARMUP)
        return FLOOR + (PEAK - FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))

    assert lr[0] == pytest.approx(START)
    assert lr[WARMUP // 2] == pytest.approx(START + (PEAK - START) / 2)
    assert lr[WARMUP] == pytest.approx(PEAK)  # end of warmup
    mid = WARMUP + (STEPS - WARMUP) // 2
    assert lr[mid] == pytest.approx((PEAK + FLOOR) / 2)  # half way through the decay
    assert lr[STEPS - 1] == pytest.approx(cosine(STEPS - 1)) and lr[STEPS - 1] < FLOOR * 1.01  # the end
    assert max(lr.values()) == pytest.approx(PEAK) and min(lr.values()) == pytest.approx(START)


def test_weight_decay_skips_norms_biases_and_embeddings():
    model = Transformer(get_model_config("gpt2-tiny"))
    blocks, other_decay, no_decay = split_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in blocks) == sorted(
        f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
    )
    assert other_decay == []  # the output head is tied to the token embedding
    assert {names[id(p)] for p in no_decay} >= {"tok_emb.weight", "pos_emb.weight", "norm_f.weight", "norm_f.bias",
                                                 "blocks.0.attn.qkv.bias", "blocks.1.norm2.weight"}
    optimizer = build_optimizer(model, load_config("debug").optim, "cpu")
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))

    llama = Transformer(get_model_config("llama-tiny"))
    _, other_decay, _ = split_parameters(llama)
    assert other_decay == [llama.lm_head.weight]  # an untied head is a matmul weight: decayed


def _run_steps(config: RunConfig) -> tuple[Trainer, list[dict]]:
    trainer = Trainer(config, DistEnv())
    trainer.fit()
    return trainer, [r for r in trainer.logger.records if r["kind"] == "train"]


@pytest.mark.slow
def test_galore_trains_a_tiny_model(tmp_path, gutenberg_dataset):  # noqa: F811
    from galore_torch import GaLoreAdamW

    config = _config(
        gutenberg_dataset, tmp_path, "train.max_steps=8", "schedule.warmup_steps=0", "train.log_every=1",
        "eval.every=0", "eval.sample_max_new_tokens=0", "optim.galore.enabled=true", "optim.galore.rank=8",
        "optim.galore.update_proj_gap=4",
    )
    trainer, train = _run_steps(config)
    optimizer = trainer.state.optimizer
    assert isinstance(optimizer, GaLoreAdamW)
    galore_group = next(g for g in optimizer.param_groups if "rank" in g)
    assert (galore_group["rank"], galore_group["update_proj_gap"]) == (8, 4)
    qkv = trainer.state.model.blocks[0].attn.qkv.weight
    assert qkv.shape == (192, 64) and optimizer.state[qkv]["exp_avg"].shape == (192, 8)  # moments in rank 8
    assert train[-1]["loss"] < train[0]["loss"] - 0.5


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(tmp_path, gutenberg_dataset):  # noqa: F811
    common = ["train.max_steps=3", "schedule.warmup_steps=0", "train.log_every=1", "eval.every=0",
              "eval.sample_max_new_tokens=0", "logging.plot=false"]
    eager, eager_train = _run_steps(_config(gutenberg_dataset, tmp_path / "eager", *common))
    compiled_config = _config(gutenberg_dataset, tmp_path / "compiled", *common, "train.compile=true")
    compiled, compiled_train = _run_steps(compiled_config)
    assert type(compiled.parallel.module).__name__ == "OptimizedModule"
    for a, b in zip(eager_train, compiled_train):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
    for p, q in zip(eager.state.model.parameters(), compiled.state.model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-4, rtol=0)


def test_bf16_modes_train_like_fp32_with_fp32_weights_and_the_copy_resumes_exactly(tmp_path, gutenberg_dataset):  # noqa: F811
    # train.dtype=auto picks bf16 on CPUs with native bf16 (and on CUDA); bf16_copy is the default mode.
    common = ["train.max_steps=12", "schedule.warmup_steps=0", "train.log_every=1", "eval.every=0",
              "eval.sample_max_new_tokens=0", "logging.plot=false", "train.grad_accum_steps=2"]
    _, fp32_train = _run_steps(_config(gutenberg_dataset, tmp_path / "fp32", *common))
    fp32_losses = [r["loss"] for r in fp32_train]
    bf16 = {}
    for mode in ("autocast", "bf16_copy"):
        config = _config(gutenberg_dataset, tmp_path / mode, *common, "train.dtype=bf16", f"train.bf16_mode={mode}",
                         "checkpoint.every=6")
        trainer, train = _run_steps(config)
        bf16[mode] = trainer
        assert trainer.dtype == "bf16"
        # Both compute in bf16 but keep the weights, gradients and AdamW moments in fp32.
        assert {p.dtype for p in trainer.state.model.parameters()} == {torch.float32}
        assert {s["exp_avg"].dtype for s in trainer.state.optimizer.state.values()} == {torch.float32}
        losses = [r["loss"] for r in train]
        assert losses != fp32_losses  # bf16 matmuls really ran
        assert max(abs(a - b) for a, b in zip(fp32_losses, losses)) < 0.1
        assert losses[-1] < losses[0] - 1.0
    copy = bf16["bf16_copy"].parallel
    assert {p.dtype for p in copy.module.parameters()} == {torch.bfloat16}
    # The copy holds the final fp32 weights rounded to bf16; no gradient is left on it.
    for master, compute in copy.bf16_copy.pairs:
        assert torch.equal(compute, master[: len(compute)].to(torch.bfloat16)) and compute.grad is None

    # Stopped after step 6 and resumed: the copy is rebuilt from the checkpoint's fp32 weights
    # and the run ends with exactly the weights of the uninterrupted one.
    resumed_dir = tmp_path / "resumed"
    config = _config(gutenberg_dataset, resumed_dir, *common, "train.dtype=bf16", "checkpoint.every=6")
    first = Trainer(config, DistEnv())
    for _ in range(6):
        first.train_step()
    first.save(blocking=True)
    first.checkpointer.close()
    second = Trainer(config, DistEnv())
    assert second.state.step == 6
    second.fit()
    for a, b in zip(bf16["bf16_copy"].state.model.parameters(), second.state.model.parameters()):
        assert torch.equal(a, b)


FAULTS_OF_A_REALLOCATED_BUFFER = """
import resource, sys, torch
from gptrain.device import keep_freed_cpu_memory
if sys.argv[1] == "keep":
    assert keep_freed_cpu_memory()
torch.ones(64 * 2**20)  # 256 MiB written, then freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(48 * 2**20)  # 192 MiB written, then freed
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_cpu_training_reuses_freed_memory_without_page_faults():
    # What a training step does with its activations: large buffers, freed and allocated
    # again. By default glibc maps such a block afresh (49,152 pages faulted in); after
    # keep_freed_cpu_memory (the trainer calls it on CPU) the heap reuses the freed one.
    def faults(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", FAULTS_OF_A_REALLOCATED_BUFFER, mode],
                             capture_output=True, text=True, check=True)
        return int(run.stdout)

    assert faults("default") > 45_000
    assert faults("keep") < 1_000


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.max_stepz=5", "train.max_stepz"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.galore.rank=0", "optim.galore.rank"),
        ("schedule.warmup_steps=1000", "schedule.warmup_steps"),
    ],
)
def test_invalid_config_is_refused_naming_the_key(capsys, tmp_path, override, named):
    status = gptrain_main(["train", "--config", "debug", f"train.run_dir={tmp_path}", override])
    assert status == 2
    assert named in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_missing_data_path_is_refused(capsys, tmp_path):
    assert gptrain_main(["train", "--config", "debug", f"train.run_dir={tmp_path}"]) == 2
    assert "data.path is not set" in capsys.readouterr().err


def test_vocabulary_mismatch_is_refused_at_start(tmp_path, gutenberg_dataset):  # noqa: F811
    config = _config(gutenberg_dataset, tmp_path / "run", "model.vocab_size=32000")
    with pytest.raises(GptrainError, match=r"50257-token vocabulary .*model.vocab_size is 32000"):
        Trainer(config, DistEnv())
    assert not (tmp_path / "run").exists()


def test_resumed_logger_keeps_records_up_to_the_checkpoint_and_skips_a_torn_line(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = [{"kind": "train", "step": step, "loss": 1.0 / step} for step in (1, 2, 3, 4)]
    # Steps 1-4 logged, then the process died while appending step 5's line.
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "tra')
    config = load_config("debug", [f"train.run_dir={run_dir}", "logging.plot=false"])
    logger = MetricsLogger(config, enabled=True, resume_step=3)
    assert logger.records == records[:3]  # step 4 comes again after the step-3 checkpoint
    assert _records(run_dir) == records[:3]


def test_token_budget_sets_the_number_of_steps(tmp_path, gutenberg_dataset):  # noqa: F811
    config = _config(
        gutenberg_dataset, tmp_path, "train.max_steps=null", "train.max_tokens=10000", "schedule.warmup_steps=5",
        "train.micro_batch_size=4", "train.grad_accum_steps=2", "model.context_length=64",
    )
    trainer = Trainer(config, DistEnv())
    assert trainer.tokens_per_step == 4 * 2 * 64
    assert trainer.total_steps == math.ceil(10000 / 512) == 20


def test_run_directory_on_object_storage(s3_bucket, gutenberg_dataset):  # noqa: F811
    from gptrain import storage

    run_dir = f"{s3_bucket}/runs/tiny"
    config = load_config("debug", [
        f"data.path={gutenberg_dataset}", f"train.run_dir={run_dir}", "train.max_steps=3",
        "schedule.warmup_steps=0", "train.log_every=1", "eval.every=2", "eval.max_windows=4",
        "eval.sample_max_new_tokens=0",
    ])
    Trainer(config, DistEnv()).fit()
    records = [json.loads(line) for line in storage.read_bytes(f"{run_dir}/metrics.jsonl").decode().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [
        ("eval", 0), ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("checkpoint", 3), ("eval", 3), ("end", 3)
    ]
    assert load_config(f"{run_dir}/config.yaml") == config
    assert storage.read_bytes(f"{run_dir}/loss.png").startswith(b"\x89PNG")


def test_wandb_offline_run_records_the_metrics(tmp_path, gutenberg_dataset, monkeypatch):  # noqa: F811
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = _config(
        gutenberg_dataset, tmp_path, "train.max_steps=2", "schedule.warmup_steps=0", "train.log_every=1",
        "eval.every=0", "eval.max_windows=4", "eval.sample_max_new_tokens=0", "logging.plot=false",
        "logging.wandb=true", "logging.wandb_project=gptrain-test", "logging.wandb_run_name=offline-check",
    )
    Trainer(config, DistEnv()).fit()
    (wandb_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    expected = (b"train/loss", b"eval/val_loss", b"offline-check", b"gptrain-test", b"micro_batch_size")
    # wandb's own service process writes this file; on a loaded machine its last records can
    # land a moment after finish() has returned.
    deadline = time.monotonic() + 30
    while not all(e in wandb_file.read_bytes() for e in expected) and time.monotonic() < deadline:
        time.sleep(0.5)
    data = wandb_file.read_bytes()
    for e in expected:
        assert e in data


def test_wandb_missing_package_is_a_clear_error(tmp_path, gutenberg_dataset, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets when it is not installed
    config = _config(gutenberg_dataset, tmp_path, "logging.wandb=true")
    with pytest.raises(GptrainError, match=r"logging.wandb=true .* pip install 'gptrain\[wandb\]'"):
        Trainer(config, DistEnv())
    assert not any(tmp_path.iterdir())


def test_mfu_uses_the_stated_peak():
    peak = PeakFlops(989e12, "NVIDIA H100 80GB HBM3, dense bf16")
    assert mfu(1e9, 1e5, peak, world_size=2) == pytest.approx(1e14 / (2 * 989e12))
    assert mfu(1e9, 1e5, PeakFlops(None, "cpu"), world_size=1) is None
    assert "989.0 TFLOP/s" in peak.describe()


@pytest.mark.parametrize(
    "name, dtype, peak",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
        ("NVIDIA H100 PCIe", "bf16", 756e12),
        ("NVIDIA GH200 480GB", "bf16", 989e12),
        ("NVIDIA A100-SXM4-80GB", "fp32", 156e12),
        ("NVIDIA L40S", "bf16", 362e12),
        ("NVIDIA L4", "bf16", 121e12),
        ("Tesla V100-SXM2-32GB", "bf16", None),
        ("Some Future GPU", "bf16", None),
    ],
)
def test_gpu_peak_table(name, dtype, peak):
    found = gpu_peak_flops(name, dtype)
    assert found.flops == peak
    assert name in found.source
