"""The run configuration: presets, YAML files, dotted overrides, validation, the LR schedule."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import yaml

from gptrain.config import (
    RunConfig,
    ScheduleConfig,
    TrainConfig,
    load_config,
    lr_at,
    preset_names,
)
from gptrain.device import has_native_bf16, resolve_dtype
from gptrain.errors import GptrainError


def test_shipped_presets_load_and_round_trip_exactly():
    assert {"debug", "gpt2-124m-gutenberg"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        assert RunConfig.from_dict(cfg.to_dict()) == cfg
        assert RunConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
        # The dict form is plain YAML data (it goes into config.yaml and checkpoints).
        assert yaml.safe_load(cfg.to_yaml()) == cfg.to_dict()


def test_gpt2_preset_is_the_reference_book_setup():
    cfg = load_config("gpt2-124m-gutenberg")
    model = cfg.model.resolve()
    assert (model.n_layers, model.n_heads, model.d_model, model.context_length) == (12, 12, 768, 1024)
    assert cfg.optim.lr == 5e-4 and cfg.optim.weight_decay == 0.1 and cfg.optim.grad_clip == 1.0
    assert cfg.schedule.kind == "cosine" and 0 < cfg.schedule.warmup_steps
    assert cfg.schedule.initial_lr < cfg.optim.lr and cfg.schedule.min_lr < cfg.optim.lr
    assert cfg.data.path is None  # the user names the dataset
    # 16 x 32 x 1024 tokens: GPT-3 small's half-million-token batch on one GPU.
    assert cfg.tokens_per_step(world_size=1) == 524_288
    assert 9_000 < cfg.total_steps(cfg.tokens_per_step(world_size=1)) < 10_000


def test_debug_preset_is_tiny_and_cpu_only():
    cfg = load_config("debug")
    model = cfg.model.resolve()
    assert cfg.model.name == "gpt2-tiny" and model.context_length == 64 and model.d_model == 64
    assert (cfg.train.device, cfg.train.dtype, cfg.train.compile) == ("cpu", "fp32", False)
    assert cfg.eval.every == 50 and cfg.eval.max_windows <= 32
    assert 100 <= cfg.train.max_steps <= 500


def test_dotted_overrides_are_parsed_and_typed():
    cfg = load_config(
        "debug",
        [
            "optim.lr=3e-4",  # PyYAML reads this as a string: it must still become a float
            "train.max_steps=200",
            "logging.wandb_tags=[a,b]",
            "optim.galore.enabled=true",
            "optim.galore.rank=64",
            "logging.wandb_run_name=2024",  # a string key keeps the text as written
            "eval.sample_prompt=Chapter 1: It was",
            "checkpoint.init_from=null",
            "data.path=s3://bucket/dataset",
            "model.n_layers=3",
            "optim.fused=auto",
        ],
    )
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_steps == 200
    assert cfg.logging.wandb_tags == ["a", "b"]
    assert cfg.optim.galore.enabled and cfg.optim.galore.rank == 64
    assert cfg.logging.wandb_run_name == "2024"
    assert cfg.eval.sample_prompt == "Chapter 1: It was"
    assert cfg.checkpoint.init_from is None
    assert cfg.data.path == "s3://bucket/dataset"
    assert cfg.model.resolve().n_layers == 3 and cfg.model.resolve().d_model == 64
    # Everything not overridden keeps the preset's value.
    assert cfg.train.device == "cpu" and cfg.eval.every == 50


def test_switching_from_steps_to_a_token_budget():
    cfg = load_config("debug", ["train.max_steps=null", "train.max_tokens=1e6"])
    assert cfg.train.max_tokens == 1_000_000 and cfg.train.max_steps is None
    tokens_per_step = cfg.tokens_per_step(world_size=2)
    assert tokens_per_step == 4 * 1 * 2 * 64  # micro batch x accumulation x ranks x context
    assert cfg.total_steps(tokens_per_step) == math.ceil(1_000_000 / 512)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optimm.lr=1", ["unknown section 'optimm'", "model, data, optim, schedule, train"]),
        ("optim.lrr=1", ["unknown key 'optim.lrr'", "lr, weight_decay, beta1"]),
        ("optim.galore.rnk=2", ["unknown key 'optim.galore.rnk'", "enabled, rank"]),
        ("optim.lr.x=2", ["optim.lr has no sub-keys"]),
        ("train.max_steps=abc", ["train.max_steps='abc'", "expected an integer or null"]),
        ("train.max_steps=2.5", ["train.max_steps=2.5", "an integer"]),
        ("train.compile=maybe", ["train.compile='maybe'", "true/false"]),
        ("optim.lr=fast", ["optim.lr='fast'", "expected a number"]),
        ("logging.wandb_tags=a", ["logging.wandb_tags='a'", "a list, each item a string"]),
        ("logging.wandb_tags=[1]", ["logging.wandb_tags[0]=1"]),
        ("optim.fused=sometimes", ["optim.fused='sometimes'", "true/false or 'auto'"]),
        ("optim.galore=3", ["section 'optim.galore' must be a mapping"]),
        ("optim.lr=-1", ["optim.lr=-1.0", "must be > 0"]),
        ("optim.lr=.inf", ["optim.lr=inf"]),
        ("optim.beta2=1", ["optim.beta2=1.0"]),
        ("checkpoint.keep_last=1", ["checkpoint.keep_last=1", ">= 2"]),
        ("checkpoint.keep_every=150", ["checkpoint.keep_every=150", "multiple of checkpoint.every (100)"]),
        ("schedule.warmup_steps=201", ["schedule.warmup_steps=201", "200 steps"]),
        ("schedule.min_lr=1", ["schedule.min_lr=1.0", "peak optim.lr"]),
        ("schedule.kind=linear", ["schedule.kind='linear'", "'cosine', 'constant'"]),
        ("train.device=tpu", ["train.device='tpu'", "'auto', 'cpu', 'cuda'"]),
        ("train.max_tokens=1000", ["train.max_steps=200, train.max_tokens=1000", "only one"]),
        ("train.max_steps=null", ["train.max_steps=None, train.max_tokens=None", "set one of them"]),
        ("model.name=gpt5", ["model.name='gpt5'", "gpt2-124m", "llama3.2-1b"]),
        ("model.d_model=66", ["model.d_model (66)", "n_heads (4)"]),
        ("eval.every=-1", ["eval.every=-1"]),
        ("optim.lr", ["expected section.key=value"]),
        ("comm.timeout_s=0", ["comm.timeout_s=0.0", "must be > 0"]),
        ("comm.init_timeout_s=soon", ["comm.init_timeout_s='soon'", "expected a number"]),
        ("checkpoint.requeue=true", ["'checkpoint.requeue' was removed", "exit status 75", "GPTRAIN_MAX_REQUEUES"]),
    ],
)
def test_bad_overrides_name_the_key_and_value(override, expected):
    with pytest.raises(GptrainError) as err:
        load_config("debug", [override])
    for text in expected:
        assert text in str(err.value)


def test_yaml_files_and_their_errors(tmp_path):
    good = tmp_path / "run.yaml"
    good.write_text(
        "model:\n  name: llama-tiny\n  context_length: 32\n"
        "train:\n  max_tokens: 5_000\n"
        "optim:\n  lr: 1e-3\n"  # no dot: PyYAML reads a string, the config a float
    )
    cfg = load_config(str(good))
    assert cfg.model.name == "llama-tiny" and cfg.model.resolve().context_length == 32
    assert cfg.optim.lr == 1e-3 and cfg.train.max_tokens == 5000
    assert cfg.eval == RunConfig().eval  # sections left out take their defaults
    assert load_config(good.as_uri()) == cfg  # URLs go through gptrain.storage

    with pytest.raises(GptrainError, match="'nope.yaml' is neither a shipped preset .*debug.* nor an existing YAML"):
        load_config("nope.yaml")

    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(GptrainError, match=f"{broken}: not valid YAML"):
        load_config(str(broken))

    listing = tmp_path / "list.yaml"
    listing.write_text("- model\n- train\n")
    with pytest.raises(GptrainError, match=f"{listing}: expected a mapping of sections"):
        load_config(str(listing))

    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  max_step: 10\n")
    with pytest.raises(GptrainError, match=rf"{typo}: unknown key 'train.max_step'; valid keys in train: run_dir, max_"):
        load_config(str(typo))

    with pytest.raises(GptrainError, match=rf"{good} with overrides optim.lr=0: optim.lr=0.0: must be > 0"):
        load_config(str(good), ["optim.lr=0"])


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config("gpt2-124m-gutenberg", ["data.path=/data/gutenberg", "logging.wandb=true", "optim.lr=6e-4"])
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_yaml())
    assert load_config(str(saved)) == cfg


def test_configs_are_immutable_and_defaults_valid():
    cfg = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]
    assert RunConfig.from_dict({}) == cfg
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_dtype_resolution(monkeypatch):
    train = TrainConfig(max_steps=1)
    # "auto" on this CPU follows what /proc/cpuinfo says the cores compute natively.
    flags = set(" ".join(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split())
    native = bool({"avx512_bf16", "amx_tile"} & flags)
    assert has_native_bf16("cpu") == native
    assert train.resolved_dtype("cpu") == ("bf16" if native else "fp32")
    for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, check, lambda: False)
    assert train.resolved_dtype("cpu") == "fp32"  # oneDNN would emulate bf16: slower than fp32
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert TrainConfig(max_steps=1, dtype="fp32").resolved_dtype("cuda") == "fp32"
    assert TrainConfig(max_steps=1, dtype="bf16").resolved_dtype("cpu") == "bf16"
    assert TrainConfig(max_steps=1, device="cpu").resolved_device() == "cpu"


def test_lr_schedule_warmup_then_cosine_to_the_floor():
    schedule = ScheduleConfig(kind="cosine", warmup_steps=10, initial_lr=1e-4, min_lr=1e-5)
    peak, steps = 1e-3, 110
    lrs = [lr_at(step, schedule, peak, steps) for step in range(steps + 1)]
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[5] == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # linear warmup
    assert lrs[10] == pytest.approx(peak)
    assert lrs[60] == pytest.approx((peak + 1e-5) / 2)  # half way through the decay
    assert lrs[110] == pytest.approx(1e-5)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a > b for a, b in zip(lrs[10:110], lrs[11:111]))
    assert lr_at(500, schedule, peak, steps) == pytest.approx(1e-5)  # beyond the end: the floor

    constant = ScheduleConfig(kind="constant", warmup_steps=4, initial_lr=0.0)
    assert [lr_at(s, constant, 1.0, 10) for s in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 1.0]
    no_warmup = ScheduleConfig(kind="cosine")
    assert lr_at(0, no_warmup, 2.0, 10) == 2.0
