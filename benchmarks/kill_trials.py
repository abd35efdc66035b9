"""Kill trials: `gptrain train` SIGKILLed at seeded random moments, rerun, compared bit for bit.

For each mode (one process with synchronous saves, one with async saves, 2 DDP ranks under
torchrun), a tiny GPT-2 trains once uninterrupted; then the same run is started, killed
with SIGKILL after a random delay drawn from [0, 0.6 x the length of an uninterrupted run]
(a resumed run has less left to do), and started again, over and over: kills land in
startup, in steps, evaluations, saves (a delay after each shard write widens them), commits
and retention. When a run completes it is compared with the uninterrupted one and a fresh
run directory takes the next kills. After every kill each committed checkpoint is verified
(sizes and sha256s). Reported per mode:

    kills         SIGKILLs delivered (2 ranks: torchrun and both workers, like a lost node)
    in_save       of those, kills that left a save unfinished (a step folder without marker)
    runs          runs brought to completion across the kills
    failed        launches that ended on their own with a non-zero status (a failed resume)
    non_bitwise   completed runs whose logged losses or final weights differ from the
                  uninterrupted run's (torch.equal)
    corrupt       committed checkpoints that failed verification after a kill

    .venv/bin/python benchmarks/kill_trials.py [--kills sync=9,async=9,ddp2=6] [--seed 17] [--dir DIR]

The training processes are tests/test_resume.py's instrumented worker (the real `gptrain
train`, slowed by --step-delay/--save-delay); tests/test_reliability.py runs a few trials
through `run_trials`. Needs root for the 2-rank mode (torchrun runs in a network namespace
with loopback only, as in the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from checkpoint_fixtures import prepare_dataset, same_weights  # noqa: E402
from conftest import is_running  # noqa: E402
from test_resume import WINDOWS, ForkServer, start, train_records, write_config  # noqa: E402

from gptrain.checkpoint import commit as commits  # noqa: E402
from gptrain.checkpoint.commit import CheckpointError  # noqa: E402
from gptrain.checkpoint.export import load_model_from_checkpoint  # noqa: E402

MODES = {
    # (worker options, config sections, ranks)
    "sync": (("--step-delay", "0.02", "--save-delay", "0.2"), {}, 0),
    "async": (("--step-delay", "0.02", "--save-delay", "0.2"), {"checkpoint": {"async_save": True}}, 0),
    "ddp2": (("--step-delay", "0.05", "--save-delay", "0.2"),
             {"train": {"max_steps": None, "max_tokens": WINDOWS * 32, "grad_accum_steps": 1}}, 2),
}


@dataclass
class Result:
    mode: str
    kills: int = 0
    in_save: int = 0
    runs: int = 0
    failed: int = 0
    non_bitwise: int = 0
    corrupt: int = 0
    seconds: float = 0.0


class Launcher:
    """Starts one training of `config` and tells whether it still runs, kills it, reaps it."""

    def __init__(self, config: Path, options: tuple[str, ...], ranks: int, log: Path):
        self.config, self.options, self.ranks, self.log = config, options, ranks, log
        self.server = ForkServer(config, *options, log=log) if not ranks else None
        self.proc: subprocess.Popen | None = None
        self.pid = 0

    def launch(self) -> None:
        if self.server is not None:
            self.pid = self.server.launch()
        else:
            self.proc = start(self.config, *self.options, ranks=self.ranks, log=self.log)
            self.pid = self.proc.pid

    def running(self) -> bool:
        return is_running(self.pid) if self.server is not None else self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the training and, for torchrun, its workers (which run in sessions of
        their own): as if the node were lost."""
        for pid in [self.pid, *_descendants(self.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def status(self) -> int:
        if self.server is not None:
            return self.server.status()
        status = self.proc.wait()
        for pid in _descendants(self.pid):  # nothing of a killed torchrun may live on
            os.kill(pid, signal.SIGKILL)
        return status

    def close(self) -> None:
        if self.server is not None:
            self.server.__exit__(None, None, None)


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        children = [child for child, parent in parents.items() if parent == current]
        found += children
        todo += children
    return found


def _timed_run(launcher: Launcher) -> float:
    begin = time.monotonic()
    launcher.launch()
    status = launcher.status()
    if status != 0:
        raise RuntimeError(f"the uninterrupted run failed with status {status}; see {launcher.log}")
    return time.monotonic() - begin


def _verify_committed(run_dir: Path) -> int:
    """How many committed checkpoints of `run_dir` fail verification (sizes and sha256s)."""
    corrupt = 0
    for commit in commits.committed(str(run_dir)):
        try:
            commits.verify(commit)
        except CheckpointError as err:
            print(f"  CORRUPT: {err}", flush=True)
            corrupt += 1
    return corrupt


def _unfinished_save(run_dir: Path) -> bool:
    return any(not (Path(url) / commits.MARKER_FILE).exists() for _, url in commits.step_folders(str(run_dir)))


def run_trials(mode: str, kills: int, seed: int, root: Path, data: Path) -> Result:
    """`kills` seeded SIGKILL trials of `mode` under `root` (see the module docstring)."""
    options, sections, ranks = MODES[mode]
    rng = random.Random(f"{seed}-{mode}")
    result, begin = Result(mode), time.monotonic()
    log = root / f"{mode}.log"
    straight_dir = root / f"{mode}-straight"
    straight = Launcher(write_config(root / f"{mode}-straight.yaml", data, str(straight_dir), **sections),
                        options, ranks, log)
    try:
        length = _timed_run(straight)
    finally:
        straight.close()
    print(f"  {mode}: an uninterrupted run takes {length:.1f} s", flush=True)
    expected = train_records(straight_dir)
    expected_model = load_model_from_checkpoint(str(straight_dir))
    attempt = 0
    while result.kills < kills:
        attempt += 1
        run_dir = root / f"{mode}-killed-{attempt}"
        launcher = Launcher(write_config(root / f"{mode}-killed-{attempt}.yaml", data, str(run_dir), **sections),
                            options, ranks, log)
        try:
            while True:
                launcher.launch()
                deadline = time.monotonic() + rng.uniform(0.0, 0.6 * length)
                while launcher.running() and time.monotonic() < deadline:
                    time.sleep(0.005)
                killed = launcher.running() and result.kills < kills
                if killed:
                    launcher.kill()
                status = launcher.status()
                if killed:
                    result.kills += 1
                    result.in_save += _unfinished_save(run_dir)
                    result.corrupt += _verify_committed(run_dir)
                    continue
                if status != 0:
                    result.failed += 1
                    print(f"  FAILED: {mode} run {attempt} exited with {status}; see {log}", flush=True)
                    if result.failed > 3:
                        result.seconds = time.monotonic() - begin
                        return result
                    continue
                break  # completed
        finally:
            launcher.close()
        result.runs += 1
        bitwise = train_records(run_dir) == expected and same_weights(
            load_model_from_checkpoint(str(run_dir)), expected_model)
        result.non_bitwise += not bitwise
        print(f"  {mode} run {attempt} completed after {result.kills} kill(s) so far: "
              f"{'bitwise equal' if bitwise else 'DIFFERENT'}", flush=True)
    result.seconds = time.monotonic() - begin
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", default="sync=9,async=9,ddp2=6", help="mode=count,... (modes: sync, async, ddp2)")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--dir", help="work folder (default: a temporary one, removed afterwards)")
    args = parser.parse_args()
    os.environ.update(OMP_NUM_THREADS="1")
    plan = {mode: int(count) for mode, count in (item.split("=") for item in args.kills.split(","))}
    root = Path(args.dir or tempfile.mkdtemp(prefix="kill-trials-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        data = prepare_dataset(root / "dataset")
        results = []
        for mode, count in plan.items():
            print(f"{mode}: {count} kills (seed {args.seed})", flush=True)
            results.append(run_trials(mode, count, args.seed, root, data))
        print(f"\n{'mode':<6} {'kills':>5} {'in_save':>7} {'runs':>4} {'failed':>6} {'non_bitwise':>11} "
              f"{'corrupt':>7} {'seconds':>7}")
        for r in results:
            print(f"{r.mode:<6} {r.kills:>5} {r.in_save:>7} {r.runs:>4} {r.failed:>6} {r.non_bitwise:>11} "
                  f"{r.corrupt:>7} {r.seconds:>7.0f}")
        total = {k: sum(getattr(r, k) for r in results) for k in ("kills", "failed", "non_bitwise", "corrupt")}
        print(f"total: {json.dumps(total)}")
        (root / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
