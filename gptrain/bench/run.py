"""Run the ladder: a rung at a time, each in fresh processes, reporting as it goes."""

from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
import time
from dataclasses import asdict
from typing import Any

from gptrain import storage
from gptrain.bench.ladder import Rung, Workload, measure_rank, run_config
from gptrain.bench.report import write_report
from gptrain.errors import EXIT_CRASH, EXIT_OK
from gptrain.launch import Layout

POLL_S = 0.2


def run_ladder(rungs: list[Rung], workload: Workload, out: str, peak: tuple[float, str], command: str,
               time_budget_s: float | None, rung_timeout_s: float) -> int:
    """Measure `rungs` in order; write the report after each. Exit status: 0, or 1 if a rung failed."""
    from gptrain.data.synthetic import write_random_dataset
    from gptrain.train.metrics import memory_kind

    import torch

    peak_flops, peak_source = peak
    devices = torch.cuda.device_count() if workload.device == "cuda" else 0
    first_config = run_config(rungs[0], workload, "unused", "unused").model.resolve()
    header: dict[str, Any] = {
        "command": command, **asdict(workload),
        "device_name": torch.cuda.get_device_name(0) if workload.device == "cuda" else _cpu_name(),
        "peak_tflops": peak_flops / 1e12, "peak_source": peak_source,
        "flops_per_token": first_config.flops_per_token(workload.context_length),
        "memory_kind": memory_kind(torch.device(workload.device)),
    }
    storage.ensure_folder(out, "--out")
    started, rows, failed = time.monotonic(), [], False
    with tempfile.TemporaryDirectory(prefix="gptrain-bench-") as scratch:
        # Random tokens: throughput does not depend on what they say. Enough for every rank's
        # windows of the longest rung (the loader wraps into further epochs regardless), and one
        # validation window per rank (the trainer checks the split can be evaluated).
        widest = max(r.settings.world_size * r.settings.batch_multiplier for r in rungs)
        window = workload.context_length + 1
        dataset = write_random_dataset(
            os.path.join(scratch, "data"), train_tokens=widest * workload.micro_batch_size * window * 8,
            val_tokens=2 * window,
        )
        for index, rung in enumerate(rungs):
            row = {"rung": rung.name, "change": rung.change, **asdict(rung.settings)}
            if time_budget_s is not None and time.monotonic() - started > time_budget_s:
                row["status"] = f"skipped: past --time-budget-s {time_budget_s:g}"
            elif workload.device == "cuda" and rung.settings.world_size > devices:
                row["status"] = f"skipped: needs {rung.settings.world_size} GPUs, {devices} visible"
            else:
                run_dir = os.path.join(scratch, f"run-{index}")
                results, status = _run_rung(rung, workload, dataset, run_dir, rung_timeout_s)
                if results is None:
                    row["status"], failed = status, True
                else:
                    row.update(_combine(results, rung, workload, peak_flops))
                    row["status"] = "ok"
            rows.append(row)
            _print_row(row)
            write_report(out, header, rows)
    print(f"wrote bench.md, bench.png and bench.json in {out}", flush=True)
    return EXIT_CRASH if failed else EXIT_OK


def _run_rung(rung: Rung, workload: Workload, dataset: str, run_dir: str,
              timeout_s: float) -> tuple[list[dict] | None, str]:
    """Start the rung's ranks (spawned: a fresh interpreter each, as `gptrain launch` starts
    them) and wait; returns (each rank's result, "") or (None, why it failed). A rank that
    fails stops the others at once: they would wait for it in a collective until a timeout."""
    import json

    world = rung.settings.world_size
    layout = Layout(world, 1, 0, "127.0.0.1", _free_port())
    context = multiprocessing.get_context("spawn")
    result_paths = [f"{run_dir}.rank{rank}.json" for rank in range(world)]
    ranks = [
        context.Process(
            target=measure_rank, args=(rung, workload, dataset, run_dir, layout.worker_env(rank), result_paths[rank]),
            name=f"bench-{rung.name}-rank{rank}",
        )
        for rank in range(world)
    ]
    deadline, status = time.monotonic() + timeout_s, ""
    try:
        for process in ranks:
            process.start()
        while any(p.is_alive() for p in ranks):
            bad = [p for p in ranks if p.exitcode not in (None, 0)]
            if bad or time.monotonic() > deadline:
                status = f"failed: {bad[0].name} exited with {bad[0].exitcode}" if bad else (
                    f"failed: over {timeout_s:g} s"
                )
                break
            time.sleep(POLL_S)
    finally:  # also when this process is interrupted: no rank outlives the benchmark
        for process in ranks:
            if process.is_alive():
                process.kill()
            if process.pid is not None:
                process.join()
    if not status and any(p.exitcode != 0 for p in ranks):
        bad = next(p for p in ranks if p.exitcode != 0)
        status = f"failed: {bad.name} exited with {bad.exitcode}"
    if status:
        return None, status
    results = []
    for path in result_paths:
        with open(path) as handle:
            results.append(json.load(handle))
    return results, ""


def _combine(results: list[dict], rung: Rung, workload: Workload, peak_flops: float) -> dict[str, Any]:
    """The rung's throughput (the tokens of all ranks, which each rank's count covers, over the
    slowest rank's time) and memory."""
    from gptrain.train.metrics import PeakFlops, mfu

    seconds = max(r["seconds"] for r in results)
    tokens_per_s = results[0]["tokens"] / seconds
    flops_per_token = run_config(rung, workload, "unused", "unused").model.resolve().flops_per_token()
    # GPUs: each rank has its own device. CPU: the ranks share the one CPU that the peak is of.
    devices = rung.settings.world_size if workload.device == "cuda" else 1
    return {
        "tokens_per_s": tokens_per_s,
        "mfu": mfu(flops_per_token, tokens_per_s, PeakFlops(peak_flops, ""), devices),
        "peak_memory_gib": max(r["peak_memory_gib"] for r in results),
        "seconds": seconds, "loss": results[0]["loss"], "setup": results[0]["description"],
    }


def _print_row(row: dict[str, Any]) -> None:
    if row.get("tokens_per_s") is None:
        print(f"{row['rung']:>12}: {row['status']}", flush=True)
        return
    mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
    print(
        f"{row['rung']:>12}: {row['tokens_per_s']:>12,.0f} tokens/s  MFU {mfu:>6}  "
        f"peak memory {row['peak_memory_gib']:.2f} GiB  ({row['change']})", flush=True,
    )


def _free_port() -> int:
    """A port for the rung's rendezvous that nothing listens on now (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return "cpu"
