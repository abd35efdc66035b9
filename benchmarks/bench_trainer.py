"""CPU training throughput: gptrain's `Trainer.train_step` against the reference book's own scripts.

The baselines are the reference's real code (../shared/reference/, from rasbt/LLMs-from-scratch
ch05/10_llm-training-speed; see its NOTICE.md), its model classes and loss function taken
unchanged from the files, in their own settings:

    00_orig   00_orig.py's GPTModel: fp32, separate Q/K/V linears, hand-written masked softmax
              attention, LayerNorm and GELU; torch.optim.AdamW(lr=5e-4, weight_decay=0.1).
    01_opt    01_opt_single_gpu.py's GPTModel: fused-QKV SDPA attention, nn.LayerNorm/GELU, the
              vocabulary padded to 50,304, the whole model cast to bf16, and
              AdamW(lr=5e-4, weight_decay=0.1, fused=True) over the bf16 weights; its
              torch.compile is left out (the issue's "without compile").

Both are GPT-2 124M (12 layers, 12 heads, d_model 768, dropout 0.1, no QKV bias, untied output
head) at the measured context. One reference step is their training loop's body:
`optimizer.zero_grad(); calc_loss_batch(...).backward(); optimizer.step()`.

How the classes are loaded: each script imports matplotlib, requests and tiktoken at the top
and defines the model among data-loading and plotting code, guarding its training under
`if __name__ == "__main__"`. Rather than import those packages for nothing, the file's syntax
tree is read and only its top-level `import torch`/`torch.nn` statements, class definitions and
function definitions are executed, as written, into a fresh namespace (`load_reference`): the
code that runs is theirs, byte for byte; nothing of it is copied here.

gptrain runs `Trainer(config, DistEnv()).train_step()` (accumulation, clipping, the schedule) on
its default configuration for this model, the gpt2-124m-gutenberg preset, with the measured
context and micro-batch and one micro-batch per step (`--set` adds overrides, `--variant`
adds more gptrain contenders). All contenders draw windows from the same prepared dataset.

Timing: the machine is shared and noisy, so contenders run interleaved, one step each per round
(a load change hits all alike), after warm-up rounds; each contender's median step over the
rounds counts, and each ratio is also given as the median of the per-round ratios. Each
contender lives in its own process and steps only when told to, so one runs at a time: each
runs under its own process-wide settings, and one's freed memory or thread pool cannot help or
hinder another. gptrain's Trainer sets glibc's malloc to keep freed memory on CPU
(`keep_freed_cpu_memory`); each reference runs twice, as its script runs (glibc's defaults)
and with that same setting ("+kept"), so that the ratios show what the setting is worth and
what the rest of the step is.

    .venv/bin/python benchmarks/bench_trainer.py [--data DATASET] [--setups 256x2,1024x1] [--rounds 7]

Without --data, a dataset is prepared from the shared test mirror into a temporary folder.
"""

from __future__ import annotations

import argparse
import ast
import multiprocessing
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gptrain.config import load_config
from gptrain.data.loader import TokenDataset, TokenLoader
from gptrain.device import keep_freed_cpu_memory
from gptrain.distributed import DistEnv
from gptrain.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO.parent / "shared" / "gutenberg-mirror"
REFERENCE = REPO.parent / "shared" / "reference"
PRESET = "gpt2-124m-gutenberg"


def load_reference(script: Path) -> dict:
    """The torch imports, classes and functions of a reference script, executed unchanged."""
    tree = ast.parse(script.read_text(), filename=str(script))

    def wanted(node: ast.stmt) -> bool:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            return True
        if isinstance(node, ast.Import):
            return all(alias.name.split(".")[0] in ("torch", "os", "time") for alias in node.names)
        if isinstance(node, ast.ImportFrom):
            return (node.module or "").split(".")[0] == "torch"
        return False

    module = ast.Module(body=[node for node in tree.body if wanted(node)], type_ignores=[])
    namespace: dict = {"__name__": f"reference_{script.stem}"}
    exec(compile(module, str(script), "exec"), namespace)  # noqa: S102 - the reference's own code
    return namespace


def reference_config(vocab_size: int, context_length: int) -> dict:
    """GPT_CONFIG_124M of the reference scripts (00_orig: vocab 50,257; 01_opt: 50,304)."""
    return {"vocab_size": vocab_size, "context_length": context_length, "emb_dim": 768, "n_heads": 12,
            "n_layers": 12, "drop_rate": 0.1, "qkv_bias": False}


def reference_step(script: str, kept_memory: bool, context: int, batch: int,
                   dataset_path: str) -> Callable[[], None]:
    """One step of the reference's training loop per call, on its model and optimizer settings;
    `kept_memory`: under gptrain's malloc setting rather than glibc's defaults."""
    if kept_memory:
        keep_freed_cpu_memory()
    ref = load_reference(REFERENCE / script)
    device = torch.device("cpu")
    torch.manual_seed(123)
    if script == "00_orig.py":
        model = ref["GPTModel"](reference_config(50257, context))
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    else:  # 01_opt_single_gpu.py's main(), less torch.compile
        model = ref["GPTModel"](reference_config(50304, context)).to(device).to(torch.bfloat16)
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1, fused=True)
    model.train()
    loader = TokenLoader(TokenDataset(dataset_path), context, batch, seed=123)
    calc_loss_batch = ref["calc_loss_batch"]

    def step() -> None:
        x, y = loader.next_batch()
        optimizer.zero_grad()
        loss = calc_loss_batch(x, y, model, device)
        loss.backward()
        optimizer.step()

    return step


def trainer_step(overrides: list[str]) -> Callable[[], None]:
    """One optimizer step of gptrain's Trainer per call (`Trainer.train_step`, as `fit` runs it)."""
    trainer = Trainer(load_config(PRESET, overrides), DistEnv())
    return lambda: trainer.train_step()


def contender_process(build: Callable[..., Callable[[], None]], build_args: tuple, threads: int, pipe) -> None:
    """A contender's own process: build its step, then time one step per "step" received."""
    torch.set_num_threads(threads)
    step = build(*build_args)
    pipe.send("ready")
    try:
        while pipe.recv() == "step":
            start = time.perf_counter()
            step()
            pipe.send(time.perf_counter() - start)
    except (EOFError, BrokenPipeError):  # the benchmark's process is gone: nothing more to time
        pass


class Contenders:
    """Contender processes, started one after another and stepped in lockstep rounds."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.pipes: dict = {}
        self.processes: dict[str, multiprocessing.Process] = {}
        # spawn, not fork: a fresh interpreter with nothing of this process's allocator state.
        self.context = multiprocessing.get_context("spawn")

    def add(self, name: str, build: Callable[..., Callable[[], None]], *build_args) -> None:
        if name in self.pipes:
            raise SystemExit(f"bench_trainer: two contenders are named {name!r}; rename the --variant")
        pipe, child_pipe = self.context.Pipe()
        process = self.context.Process(target=contender_process, args=(build, build_args, self.threads, child_pipe),
                                       name=name, daemon=True)
        process.start()
        child_pipe.close()
        self.pipes[name], self.processes[name] = pipe, process
        self._reply(name)  # built before the next starts: two at once would share the cores

    def round(self) -> dict[str, float]:
        """One step of each contender in turn; each step's seconds as the contender measured them."""
        return {name: self._reply(name, request="step") for name in self.pipes}

    def _reply(self, name: str, request: str | None = None):
        """The contender's next message, after sending it `request`."""
        try:
            if request is not None:
                self.pipes[name].send(request)
            return self.pipes[name].recv()
        except (EOFError, BrokenPipeError):
            process = self.processes[name]
            process.join(5)
            raise SystemExit(f"bench_trainer: contender {name!r} died (exit code {process.exitcode}; -9 is "
                             "SIGKILL, as the kernel's OOM killer sends); any error of its is printed above") from None

    def __enter__(self) -> Contenders:
        return self

    def __exit__(self, *exc) -> None:
        for name, process in self.processes.items():
            if process.is_alive():
                try:
                    self.pipes[name].send("stop")
                except OSError:  # its end is already closed
                    pass
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join()


def prepare_dataset(out: Path, mirror: Path = MIRROR) -> str:
    """Five books from the test mirror, downloaded and prepared with gptrain's data pipeline."""
    from gptrain.data.download import DownloadConfig, download
    from gptrain.data.prepare import PrepareConfig, run_prepare

    raw = out / "raw"
    download(DownloadConfig(out=str(raw), mirror=str(mirror), ids=(11, 35, 41, 43, 46), rate=0))
    run_prepare(PrepareConfig(input=str(raw), out=str(out / "data"), languages=(), val_fraction=0.3, workers=1))
    return str(out / "data")


def run_pairing(context: int, batch: int, script: str, args, dataset_path: str, tmp: Path) -> None:
    """One reference script's step, as it runs and "+kept", interleaved with gptrain's default
    and any --variant."""

    def overrides(name: str, *extra: str) -> list[str]:
        return [f"model.context_length={context}", f"train.micro_batch_size={batch}", "train.grad_accum_steps=1",
                f"data.path={dataset_path}", f"train.run_dir={tmp / f'{context}x{batch}-{script}-{name}'}",
                "train.max_steps=1000000", "train.max_tokens=null", "logging.plot=false", *args.set, *extra]

    train = load_config(PRESET, overrides("default")).train
    print(f"\n124M, context {context}, batch {batch}, {args.threads} threads, against {script}: {args.warmup} "
          f"warm-up + {args.rounds} timed rounds, interleaved, each contender in its own process", flush=True)
    references = [REFERENCE_NAMES[script], REFERENCE_NAMES[script] + "+kept"]
    with Contenders(args.threads) as contenders:
        for name, kept_memory in zip(references, (False, True)):
            contenders.add(name, reference_step, script, kept_memory, context, batch, dataset_path)
        contenders.add("gptrain", trainer_step, overrides("default"))
        for variant in args.variant:
            name, _, extra = variant.partition("=")
            contenders.add(name, trainer_step, overrides(name, *extra.split(",")))
        rounds = [contenders.round() for _ in range(args.warmup + args.rounds)][args.warmup:]
    times = {name: [each[name] for each in rounds] for name in rounds[0]}
    tokens = context * batch
    for name, steps in times.items():
        median = statistics.median(steps)
        ratios = [f"{statistics.median(times[ref]) / median:4.2f}x {ref} "
                  f"({statistics.median(r / t for r, t in zip(times[ref], steps)):4.2f}x)"
                  for ref in references if name not in references]
        print(f"  {name:<16} {median:6.3f} s/step {tokens / median:6,.0f} tok/s  {'  '.join(ratios)}", flush=True)
    print(f"  (gptrain: the default, {train.resolved_dtype('cpu')} {train.bf16_mode}, compile={train.compile}; "
          "ratio of medians, then the median of per-round ratios in brackets)", flush=True)


REFERENCE_NAMES = {"00_orig.py": "00_orig", "01_opt_single_gpu.py": "01_opt"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="prepared dataset (default: a few books from the test mirror)")
    parser.add_argument("--setups", default="256x2,1024x1", help="CONTEXTxBATCH,... (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds; medians count (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--against", default=",".join(REFERENCE_NAMES), help="reference scripts (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], help="override for every gptrain contender")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=key=value,key=value: one more gptrain contender (repeatable)")
    args = parser.parse_args()
    # On SIGTERM too, leave through Contenders.__exit__, which stops the contenders' processes.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory() as tmp:
        dataset_path = args.data or prepare_dataset(Path(tmp))
        for setup in args.setups.split(","):
            context, batch = (int(part) for part in setup.split("x"))
            for script in args.against.split(","):
                # One reference script per interleaved run: every contender's weights, gradients
                # and AdamW moments stay in memory, and a "+kept" process keeps its peak heap
                # (00_orig's is 7 GB at context 1024); those of a run are freed before the next.
                run_pairing(context, batch, script, args, dataset_path, Path(tmp))


if __name__ == "__main__":
    main()
