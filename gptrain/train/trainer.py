"""The trainer: build the pieces from a `RunConfig`, then run the step loop.

    train(config)                  one run, single process or one rank of a DDP/FSDP job
      Trainer(config, env)         model (wrapped by gptrain.train.parallelize), optimizer, data, logger
        .fit()                     the step loop: train_step, logging, evaluations, summary

One optimizer step: `grad_accum_steps` micro-batches of `micro_batch_size` windows per rank,
the loss of each scaled by 1/grad_accum_steps so the gradients add up to the mean; DDP
all-reduces (FSDP reduce-scatters) the averaged gradients on the last micro-batch only. Then
the global gradient norm is clipped and AdamW steps at the scheduled learning rate. With W ranks, a step sees
W * grad_accum_steps * micro_batch_size windows; the loader hands each rank its own.

All state that changes while training lives in `TrainState`, so saving and resuming a run
means saving and restoring that object (and the RNG states): gptrain.checkpoint does both.
Rerunning the same command with the same train.run_dir resumes from the newest committed
checkpoint. On SIGTERM/SIGUSR1/SIGUSR2 the ranks stop together at a step boundary, save, and
the process exits with gptrain.errors.EXIT_PREEMPTED (75). `train` holds the run directory's lease
(gptrain.checkpoint.lease) for the whole run: one run writes a run directory at a time.

What can fail late is checked at the start (the context against the model's limit in the
config, the validation split against one evaluation), and the last checkpoint is committed
before the final evaluation, so a failure there loses no training and a rerun only evaluates.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from gptrain import storage
from gptrain.checkpoint.checkpointer import Checkpointer
from gptrain.checkpoint.lease import RunLease, hold_run_lease
from gptrain.checkpoint.preemption import Preemption, PreemptionHandler
from gptrain.config import RunConfig, lr_at
from gptrain.data.loader import TokenDataset, TokenLoader
from gptrain.device import keep_freed_cpu_memory
from gptrain.distributed import (
    DistEnv, all_reduce_mean, barrier, broadcast_object, destroy_distributed, init_distributed,
)
from gptrain.errors import GptrainError
from gptrain.models.config import ModelConfig
from gptrain.models.transformer import Transformer, count_parameters
from gptrain.train.evaluate import sample_text, validation_loss
from gptrain.train.logger import PLOT_FILE, MetricsLogger, perplexity
from gptrain.train.metrics import memory_kind, mfu, peak_flops, peak_memory_gib
from gptrain.train.optim import build_optimizer, set_learning_rate
from gptrain.train.parallelize import parallelize


@dataclass
class TrainState:
    """Everything that changes as training runs (besides the global RNG states, which dropout uses)."""

    model: Transformer  # not wrapped by DDP or torch.compile (FSDP shards it in place)
    optimizer: torch.optim.Optimizer
    loader: TokenLoader
    step: int = 0  # optimizer steps taken
    tokens_seen: int = 0  # training tokens consumed by all ranks together


def train(config: RunConfig) -> dict[str, Any]:
    """Run one training (this process's rank of it); returns the final summary."""
    env = init_distributed(
        config.train.resolved_device(), init_timeout_s=config.comm.init_timeout_s, timeout_s=config.comm.timeout_s
    )
    try:
        with hold_run_lease(config.train.run_dir, config.train.lease_timeout_s, env) as lease:
            return Trainer(config, env, lease).fit()
    finally:
        destroy_distributed()


def open_dataset(config: RunConfig, model_config: ModelConfig, world_size: int) -> TokenDataset:
    """The prepared dataset, refused when its tokenizer's vocabulary is not the model's or its
    validation split is too short for an evaluation (every run evaluates at least at its end)."""
    if config.data.path is None:
        raise GptrainError("data.path is not set: pass data.path=DATASET (a folder or URL from `gptrain data prepare`)")
    with storage.faults_named(config.data.path):
        dataset = TokenDataset(config.data.path)
    windows = dataset.tokens("val").num_tokens // (model_config.context_length + 1)
    if windows < world_size:
        raise GptrainError(
            f"data.path={config.data.path!r}: the validation split has {windows} window(s) of "
            f"{model_config.context_length + 1} tokens; evaluating needs at least one per rank ({world_size}): "
            "prepare the data with a larger --val-fraction, or set a shorter model.context_length"
        )
    if dataset.vocab_size != model_config.vocab_size:
        raise GptrainError(
            f"data.path={config.data.path!r} was tokenized with a {dataset.vocab_size}-token vocabulary "
            f"({dataset.tokenizer_spec.get('name', '?')}), but model.vocab_size is {model_config.vocab_size}: "
            "prepare the data with the model's tokenizer or set model.vocab_size to match"
        )
    return dataset


def build_model(model_config: ModelConfig, seed: int) -> Transformer:
    """The initial model, on the CPU: parallelize() moves it to the device (sharded with FSDP)."""
    torch.manual_seed(seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    return Transformer(model_config)


class Trainer:
    def __init__(self, config: RunConfig, env: DistEnv, lease: RunLease | None = None):
        """`lease`: the run directory's, checked at every step (`train` passes the one it holds)."""
        self.config, self.env, self.lease = config, env, lease
        train_cfg = config.train
        device_type = train_cfg.resolved_device()
        self.device = torch.device("cuda", env.local_rank) if device_type == "cuda" else torch.device("cpu")
        self.dtype = train_cfg.resolved_dtype(device_type)
        if device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (bf16 runs compute in bf16)
            torch.backends.cudnn.allow_tf32 = True
        else:
            keep_freed_cpu_memory()  # no page faults for the buffers every step reallocates

        self.model_config = config.model.resolve()
        self.dataset = open_dataset(config, self.model_config, env.world_size)
        model = build_model(self.model_config, train_cfg.seed)
        torch.manual_seed(train_cfg.seed + env.rank)  # dropout masks differ between ranks
        loader = TokenLoader(
            self.dataset, self.model_config.context_length, train_cfg.micro_batch_size, "train",
            seed=train_cfg.seed, rank=env.rank, world_size=env.world_size, pin_memory=self.device.type == "cuda",
        )
        # Checkpointing, compile, DDP/FSDP; before the optimizer, which must hold FSDP's shards.
        self.parallel = parallelize(model, config, env, self.device)
        self.state = TrainState(model, build_optimizer(model, config.optim, self.device.type), loader)
        # Weights, optimizer, data position, counters and (last) the RNG states of a checkpoint,
        # or checkpoint.init_from's weights for a fresh run. Nothing below draws random numbers.
        self.checkpointer = Checkpointer(config, self.dataset, self.device, lease)
        self.resumed = self.checkpointer.resume(self.state)
        self.parallel.after_weights_change()  # a bf16 copy computes with the loaded weights
        self.tokens_per_step = config.tokens_per_step(env.world_size)
        self.total_steps = config.total_steps(self.tokens_per_step)
        if self.resumed is not None and config.train.max_tokens is not None:
            # The budget left, in this world size's steps: a run resumed with a different number
            # of ranks (tokens per step) still ends at max_tokens.
            tokens_left = max(0, config.train.max_tokens - self.state.tokens_seen)
            self.total_steps = self.state.step + math.ceil(tokens_left / self.tokens_per_step)
        self.max_grad_norm = config.optim.grad_clip or float("inf")  # inf: measure the norm, never clip
        self.peak = peak_flops(self.device, self.dtype)
        self.flops_per_token = self.model_config.flops_per_token(self.model_config.context_length)
        resumed = self.resumed
        self.logger = MetricsLogger(
            config, enabled=env.is_main, resume_step=resumed.step if resumed else None,
            wandb_run_id=resumed.wandb_run_id if resumed else None,
        )
        # Rank 0's W&B run id goes into every rank's checkpoint (they must all save the same).
        self.checkpointer.wandb_run_id = broadcast_object(self.logger.wandb_run_id)
        self.tokenizer = None  # loaded on first use by the ranks that sample text (rank 0; all under fsdp)
        # A resumed run's summary starts from its first evaluation, not the first since the resume.
        self.evals: list[dict[str, Any]] = [r for r in self.logger.records if r["kind"] == "eval"]
        self._window_start, self._window_tokens = time.perf_counter(), 0

    def fit(self) -> dict[str, Any]:
        """The step loop, from `state.step` to the end of the run."""
        cfg, state = self.config, self.state
        self._log_start()
        if cfg.eval.every and self.resumed is None:
            self.evaluate()  # where the validation curve starts (a resumed run has logged it)
        start = time.perf_counter()
        with PreemptionHandler(self.device) as preemption:
            while state.step < self.total_steps:
                loss, grad_norm, lr = self.train_step()
                last = state.step == self.total_steps
                if state.step % cfg.train.log_every == 0 or last:
                    self.log_train_step(loss, grad_norm, lr)
                if cfg.eval.every and state.step % cfg.eval.every == 0 and not last:
                    self.evaluate()
                if self.checkpointer.due(state.step) and not last:
                    self.save()
                if self.lease is not None:
                    self.lease.check()  # stops this run if another process has taken its directory
                # A collective: every rank stops at this same step if any rank was signalled.
                stop = preemption.agree()
                if stop is not None:
                    return self.stop_preempted(stop, time.perf_counter() - start)
            # The final weights (for export and generate) before the final evaluation: if that
            # fails, the training is kept, and a rerun resumes here and only evaluates.
            self.save(blocking=True)
            self.checkpointer.close()
        # Rank 0 alone has the records: all ranks evaluate (a collective) or none.
        if not broadcast_object(bool(self.evals) and self.evals[-1]["step"] == state.step):
            self.evaluate()
        return self.finish(time.perf_counter() - start)

    def save(self, blocking: bool | None = None) -> None:
        """Checkpoint the state; the metrics logged up to it are durable before its commit.
        Each committed save adds a record of how long it stalled training and took to write."""
        self.logger.flush_metrics()
        self.checkpointer.save(self.state, blocking=blocking)
        for report in self.checkpointer.finished_saves():
            self.logger.log(report.metrics_record())

    def stop_preempted(self, preemption: Preemption, elapsed_s: float) -> dict[str, Any]:
        """Save synchronously (the process ends next) and finish; the summary says `preempted`."""
        self.save(blocking=True)
        self.checkpointer.close()
        # Rank 0 writes the commit marker after the others are done writing: every rank waits
        # for it here, as launchers that stop all ranks when one exits with a status other than
        # 0 (srun --kill-on-bad-exit) would otherwise stop rank 0 mid-commit.
        barrier()
        self.logger.info(
            f"preempted by {preemption.describe()} at step {self.state.step}: checkpoint committed "
            f"{preemption.seconds_since_signal():.2f} s after the signal"
        )
        return self.finish(elapsed_s, preempted=True)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step at the scheduled learning rate; returns (loss, gradient norm, lr)."""
        state = self.state
        lr = lr_at(state.step, self.config.schedule, self.config.optim.lr, self.total_steps)
        set_learning_rate(state.optimizer, lr)
        loss = self.forward_backward()
        grad_norm = self.parallel.clip_grad_norm_(state.model.parameters(), self.max_grad_norm)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        self.parallel.after_weights_change()
        state.step += 1
        state.tokens_seen += self.tokens_per_step
        return loss, grad_norm, lr

    def forward_backward(self) -> torch.Tensor:
        """Accumulate one optimizer step's gradients; returns this rank's mean loss (on device)."""
        accum = self.config.train.grad_accum_steps
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            x, y = (t.to(self.device, non_blocking=True) for t in self.state.loader.next_batch())
            with self.parallel.gradient_sync(micro == accum - 1):
                with self.parallel.step_autocast():
                    logits = self.parallel.module(x)
                loss = self.parallel.loss(logits, y) / accum
                del logits  # batch x context x vocab: the backward needs only what the loss saved
                loss.backward()
            self.parallel.after_backward()
            total += loss.detach()
        return total

    def log_train_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> None:
        state = self.state
        window_s = time.perf_counter() - self._window_start
        tokens_per_s = (state.tokens_seen - self._window_tokens) / max(window_s, 1e-9)
        # Loss: the mean over ranks. Throughput: every rank's tokens/s, added up.
        stats = all_reduce_mean(torch.stack([loss.float(), torch.tensor(tokens_per_s, device=self.device)]))
        loss_value, tokens_per_s = stats[0].item(), stats[1].item() * self.env.world_size
        self.logger.log({
            "kind": "train",
            "step": state.step,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm.item(),
            "tokens_per_s": tokens_per_s,
            "tokens_seen": state.tokens_seen,
            "mfu": mfu(self.flops_per_token, tokens_per_s, self.peak, self.env.world_size),
            "peak_memory_gib": peak_memory_gib(self.device),
        })
        self._window_start, self._window_tokens = time.perf_counter(), state.tokens_seen

    def evaluate(self) -> None:
        cfg, state = self.config.eval, self.state
        val_loss = validation_loss(
            state.model, self.dataset, self.config.train.micro_batch_size, cfg.max_windows, self.env,
            self.parallel.autocast,
        )
        sample = None
        # Under FSDP every rank takes part in each forward, so every rank samples (rank 0 logs it).
        samples_here = self.env.is_main or self.parallel.collective_forward
        if samples_here and cfg.sample_prompt and cfg.sample_max_new_tokens:
            if self.tokenizer is None:
                from gptrain.tokenizer import tokenizer_from_spec

                self.tokenizer = tokenizer_from_spec(self.dataset.tokenizer_spec)
            sample = sample_text(
                state.model, self.tokenizer, cfg, seed=self.config.train.seed,
                fixed_length=self.parallel.collective_forward,
            )
        record = {
            "kind": "eval", "step": state.step, "tokens_seen": state.tokens_seen,
            "val_loss": val_loss, "val_ppl": perplexity(val_loss), "sample": sample,
        }
        self.evals.append(record)
        self.logger.log(record)
        self.logger.flush()
        # Evaluation time is not training time: restart the throughput window.
        self._window_start, self._window_tokens = time.perf_counter(), state.tokens_seen

    def _log_start(self) -> None:
        cfg, env, mc = self.config, self.env, self.model_config
        info = self.logger.info
        info(f"run directory {cfg.train.run_dir}; data {cfg.data.path} (fingerprint {self.dataset.fingerprint[:12]})")
        info(
            f"model {cfg.model.name}: {count_parameters(self.state.model):,} parameters, {mc.n_layers} layers, "
            f"d_model {mc.d_model}, context {mc.context_length}, {self.flops_per_token / 1e6:,.1f} MFLOPs/token"
        )
        info(
            f"{env.world_size} rank(s) on {self.device.type}, {self.dtype}"
            f"{', torch.compile' if cfg.train.compile else ''}: {self.parallel.description}; "
            f"optimizer {type(self.state.optimizer).__name__}"
            f"{' (GaLore)' if cfg.optim.galore.enabled else ''}"
        )
        info(
            f"{self.total_steps:,} steps of {self.tokens_per_step:,} tokens ({env.world_size} rank(s) x "
            f"{cfg.train.grad_accum_steps} accumulation x {cfg.train.micro_batch_size} windows x "
            f"{mc.context_length} tokens); {self.state.loader.num_windows:,} training windows per epoch"
        )
        info(f"{self.peak.describe()}; memory = {memory_kind(self.device)}")

    def finish(self, elapsed_s: float, preempted: bool = False) -> dict[str, Any]:
        state, run_dir = self.state, self.config.train.run_dir
        last_train = next((r for r in reversed(self.logger.records) if r["kind"] == "train"), None)
        first, last = (self.evals[0], self.evals[-1]) if self.evals else ({}, {})
        summary = {
            "steps": state.step,
            "tokens_seen": state.tokens_seen,
            "train_seconds": elapsed_s,
            "train_loss": last_train["loss"] if last_train else None,
            "first_val_loss": first.get("val_loss"),
            "first_val_ppl": first.get("val_ppl"),
            "val_loss": last.get("val_loss"),
            "val_ppl": last.get("val_ppl"),
            "sample": last.get("sample"),
            "run_dir": run_dir,
            "preempted": preempted,
        }
        # The last metrics record says how the run ended: `gptrain status` tells a finished or
        # preempted run from one that was killed or hangs (which ends without this record).
        self.logger.log({
            "kind": "end", "step": state.step, "tokens_seen": state.tokens_seen, "time": time.time(),
            "status": "preempted" if preempted else "finished", "wandb_run_id": self.logger.wandb_run_id,
        })
        self.logger.finish(summary)
        info = self.logger.info
        info(f"done: {state.step:,} steps, {state.tokens_seen:,} tokens in {elapsed_s:,.1f} s")
        if summary["sample"] is not None:
            info(f"sample: {summary['sample']!r}")
        logging_cfg = self.config.logging
        files = ["config.yaml"] + ["metrics.jsonl"] * logging_cfg.jsonl + ["loss.png"] * logging_cfg.plot
        info(f"wrote {', '.join(files)} in {run_dir}")
        if self.evals:  # what was learned, in one line, last
            plot = f"loss curve in {storage.join(run_dir, PLOT_FILE)}" if logging_cfg.plot else "no plot (logging.plot)"
            info(
                f"learned: validation loss {first['val_loss']:.3f} -> {last['val_loss']:.3f}, perplexity "
                f"{first['val_ppl']:,.1f} -> {last['val_ppl']:,.1f} (steps {first['step']} -> {last['step']}); {plot}"
            )
        return summary
