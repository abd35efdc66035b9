"""TokenLoader memory as the dataset grows: it should stay flat.

    .venv/bin/python benchmarks/bench_loader_memory.py [--sizes 1e6,8e6,64e6] [--steps 200]

For each size it writes a synthetic dataset (random token ids in 50,000-token documents,
through the real shard writer and `finalize`), then, in a fresh process, opens it with
TokenDataset + TokenLoader (context 1024, batch 8) and draws --steps batches, which land all
over the dataset. It prints that process's memory from /proc/self/status:
  RssAnon  the process's own memory (Python objects, arrays, the window order) over a
           baseline taken after importing torch and gptrain: this is what must stay flat;
  RssFile  shard pages mapped in: page cache that the kernel can drop at any time, which
           grows with the pages touched, not with the dataset.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from gptrain.data.synthetic import write_random_dataset


def memory_kb() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def measure(dataset: str, steps: int) -> dict[str, int]:
    """Runs in a fresh process: memory before and after drawing `steps` batches."""
    import torch  # noqa: F401  (part of the baseline, as in training)

    from gptrain.data.loader import TokenDataset, TokenLoader

    before = memory_kb()
    loader = TokenLoader(TokenDataset(dataset), context_length=1024, batch_size=8, seed=1)
    for _ in range(steps):
        loader.next_batch()
    after = memory_kb()
    return {
        "windows": loader.num_windows,
        "anon_growth_kb": after["RssAnon"] - before["RssAnon"],
        "file_kb": after["RssFile"] - before["RssFile"],
        "peak_kb": after["VmHWM"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1e6,8e6,64e6", help="dataset sizes in tokens, comma-separated")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--measure", metavar="DATASET", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.steps)))
        return

    print(f"{'tokens':>12} {'windows':>9} {'anon growth MB':>15} {'shard pages MB':>15} {'peak RSS MB':>12}")
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        for size in [int(float(s)) for s in args.sizes.split(",")]:
            dataset = Path(tmp) / f"ds{size}"
            write_random_dataset(str(dataset), size)
            child = subprocess.run(
                [sys.executable, __file__, "--measure", str(dataset), "--steps", str(args.steps)],
                check=True, capture_output=True, text=True,
            )
            result = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"{size:>12,} {result['windows']:>9,} {result['anon_growth_kb'] / 1024:>15.1f} "
                  f"{result['file_kb'] / 1024:>15.1f} {result['peak_kb'] / 1024:>12.1f}")


if __name__ == "__main__":
    main()
