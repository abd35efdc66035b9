"""The ladder's results: a markdown table, a PNG bar chart and JSON, rewritten after each rung
(a ladder cut short by a time limit still leaves what it measured)."""

from __future__ import annotations

import io
from typing import Any

from gptrain import storage

TABLE_FILE, CHART_FILE, JSON_FILE = "bench.md", "bench.png", "bench.json"


def write_report(out: str, header: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    storage.write_json_atomic(storage.join(out, JSON_FILE), {**header, "rungs": rows})
    storage.write_bytes_atomic(storage.join(out, TABLE_FILE), markdown_table(header, rows).encode())
    storage.write_bytes_atomic(storage.join(out, CHART_FILE), bar_chart(header, rows))


def markdown_table(header: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        f"`{header['command']}`",
        "",
        f"- device: {header['device_name']}; model {header['model']}, context {header['context_length']}, "
        f"micro-batch {header['micro_batch_size']} per rank; {header['steps']} timed steps after "
        f"{header['warmup_steps']} warm-up steps"
        + (f"; {header['threads']} threads in all" if header["device"] == "cpu" else ""),
        f"- MFU against {header['peak_tflops']:.2f} TFLOP/s per device ({header['peak_source']}); "
        f"{header['flops_per_token'] / 1e6:,.1f} MFLOPs per token (6N + attention)",
        f"- peak memory: {header['memory_kind']}, the largest over the ranks",
        "",
        "| rung | switched on | tokens/s | vs baseline | MFU | peak memory (GiB) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    baseline = next((r["tokens_per_s"] for r in rows if r.get("tokens_per_s")), None)
    for row in rows:
        if row.get("tokens_per_s") is None:
            lines.append(f"| {row['rung']} | {row['change']} | {row['status']} | | | |")
            continue
        lines.append(
            f"| {row['rung']} | {row['change']} | {row['tokens_per_s']:,.0f} | "
            f"{row['tokens_per_s'] / baseline:.2f}x | {_percent(row['mfu'])} | {row['peak_memory_gib']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def bar_chart(header: dict[str, Any], rows: list[dict[str, Any]]) -> bytes:
    """Tokens/s and peak memory per rung, side by side; PNG bytes."""
    from matplotlib.figure import Figure  # not pyplot: no display or global state needed

    names = [r["rung"] for r in rows]
    speeds = [r.get("tokens_per_s") or 0.0 for r in rows]
    memory = [r.get("peak_memory_gib") or 0.0 for r in rows]
    figure = Figure(figsize=(11, 4.5), dpi=100)
    speed_axes, memory_axes = figure.subplots(1, 2)
    bars = speed_axes.bar(names, speeds, color="tab:blue")
    speed_axes.bar_label(bars, labels=[f"{s:,.0f}" if s else "-" for s in speeds], fontsize=7)
    speed_axes.set_ylabel("tokens/s (all ranks)")
    memory_axes.bar(names, memory, color="tab:orange")
    memory_axes.set_ylabel(f"peak memory (GiB): {header['memory_kind']}", fontsize=8)
    for axes in (speed_axes, memory_axes):
        axes.tick_params(axis="x", labelrotation=45, labelsize=8)
        axes.grid(axis="y", alpha=0.3)
    figure.suptitle(
        f"gptrain bench: {header['model']}, context {header['context_length']}, {header['device_name']}", fontsize=10
    )
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
