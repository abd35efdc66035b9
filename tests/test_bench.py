"""`gptrain bench`: the training-speed ladder, run for real (spawned ranks, gloo) at a tiny size."""

from __future__ import annotations

import json

import pytest

from gptrain.bench.ladder import Settings, ladder
from gptrain.cli import main
from gptrain.errors import EXIT_BAD_INPUT

TINY = [
    "--model", "gpt2-tiny", "--context-length", "32", "--micro-batch-size", "1", "--batch-multiplier", "2",
    "--warmup-steps", "1", "--steps", "1", "--threads", "2",
]


def test_rungs_switch_on_one_optimization_each_cumulatively():
    rungs = ladder(4)
    assert [r.name for r in rungs] == [
        "baseline", "sdpa", "fused-qkv", "bf16", "fused-adamw", "vocab-pad", "compile", "batch-x4", "ddp-2", "fsdp-2",
    ]
    assert rungs[0].settings == Settings()  # the book's chapter-5 implementation
    for before, after in zip(rungs, rungs[1:]):
        changed = [k for k, v in vars(after.settings).items() if vars(before.settings)[k] != v]
        assert len(changed) == 1, (after.name, changed)
    last = rungs[-1].settings
    assert last == Settings(
        attention="sdpa", fused_qkv=True, dtype="bf16", fused_adamw=True, vocab_pad_multiple=64, compile=True,
        batch_multiplier=4, world_size=2, parallelism="fsdp",
    )


@pytest.mark.slow
def test_cpu_ladder_writes_table_chart_and_json_with_every_rungs_tokens_per_s(tmp_path, capsys):
    """The textbook baseline, then the 2-rank rungs, which carry every switch before them
    (compile included) under DDP and FSDP2: one spawned process per rank, gloo over loopback."""
    out = tmp_path / "bench"
    status = main(["bench", "--device", "cpu", "--out", str(out), *TINY, "--rungs", "baseline,ddp-2,fsdp-2"])
    assert status == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "bench.json").read_text())
    assert report["model"] == "gpt2-tiny" and report["peak_tflops"] > 0
    assert "measured on this CPU" in report["peak_source"]
    rows = {row["rung"]: row for row in report["rungs"]}
    assert list(rows) == ["baseline", "ddp-2", "fsdp-2"]
    for name, row in rows.items():
        assert row["status"] == "ok" and row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1, row
        # All ranks' windows of the timed step, each counted once: ranks x micro-batch x multiplier x context.
        tokens = row["world_size"] * 1 * row["batch_multiplier"] * 32
        assert row["tokens_per_s"] * row["seconds"] == pytest.approx(tokens), name
        assert row["peak_memory_gib"] > 0.1  # a process that imported torch
        assert f"{name}:" in printed and "tokens/s" in printed.split(f"{name}:")[1].splitlines()[0]
    assert rows["baseline"]["attention"] == "masked" and rows["baseline"]["world_size"] == 1
    assert rows["ddp-2"]["compile"] and rows["ddp-2"]["world_size"] == 2
    assert "ddp over 2 ranks" in rows["ddp-2"]["setup"]
    assert "fsdp over 2 ranks" in rows["fsdp-2"]["setup"] and "bf16 compute" in rows["fsdp-2"]["setup"]
    table = (out / "bench.md").read_text()
    assert "| rung | switched on | tokens/s |" in table and table.count("\n| ") == 1 + 3  # header, rows
    assert "--rungs baseline,ddp-2,fsdp-2" in table  # the command that reruns it
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_are_refused_with_the_option(tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path), "--rungs", "baseline,warp-drive"]) == EXIT_BAD_INPUT
    assert "--rungs: unknown ['warp-drive']" in capsys.readouterr().err
    assert main(["bench", "--out", str(tmp_path), "--batch-multiplier", "1"]) == EXIT_BAD_INPUT
    assert main(["bench", "--out", str(tmp_path), "--steps", "-1"]) == EXIT_BAD_INPUT
    assert not any(tmp_path.iterdir())  # refused before measuring or writing anything
