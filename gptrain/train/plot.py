"""The loss curve: training and validation loss against tokens seen, as a PNG."""

from __future__ import annotations

import io
from typing import Any

from gptrain import storage


def write_loss_plot(records: list[dict[str, Any]], url: str, title: str = "") -> None:
    """Plot the train/eval records of metrics.jsonl and write the PNG to `url` (folder path or URL)."""
    from matplotlib.figure import Figure  # not pyplot: no display or global state needed

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    figure = Figure(figsize=(7, 4.5), dpi=100)
    axes = figure.add_subplot()
    axes.plot([r["tokens_seen"] for r in train], [r["loss"] for r in train], label="train loss", linewidth=1)
    axes.plot(
        [r["tokens_seen"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss", linewidth=1.5
    )
    axes.set_xlabel("tokens seen")
    axes.set_ylabel("cross-entropy loss (nats/token)")
    step = f"step {records[-1]['step']}" if records else "no records yet"
    axes.set_title(f"{title} ({step})" if title else step, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    storage.write_bytes_atomic(url, buffer.getvalue())
