"""The checkpointer of one run: when to save, the commit protocol, async saves, resuming.

    checkpointer = Checkpointer(config, dataset, device, lease)   # on every rank, same order
    resumed = checkpointer.resume(state)       # checkpoint.resume / init_from; None: fresh start
    ... each step:  if checkpointer.due(state.step): checkpointer.save(state)
    ... preempted:  checkpointer.save(state, blocking=True)
    checkpointer.close()                       # final save done by the caller; waits for any in flight

Saving step N (every rank, same order):
  1. wait for the previous async save to commit (at most one save in flight), take the state
     dict (the live tensors; the data position and RNG states as bytes);
  2. rank 0 clears RUN_DIR/checkpoints/step-N if a dead save left it, writes config.yaml;
     every rank waits for it (and stops with rank 0 if that failed);
  3. every rank writes its shard (DCP), hashing the bytes as they go out;
  4. rank 0 gathers every rank's file sha256s (so every rank has finished writing), writes
     the commit marker, then applies retention; every rank learns whether that worked.
A synchronous save does 2-4 before it returns. An async save returns after step 1; a
background thread copies the tensors into CPU buffers reused by every save, then does 2-4
from the copy. Training goes on meanwhile: the next forward and backward only read the
weights, and the next `optimizer.step` (which changes them in place) waits for the copy to
be complete. So an async save stalls training only for step 1 and for whatever of the copy
outlasts the next forward and backward. Its error (a failed write, a lost lease) is raised
by the next save, `wait` or `close`, and nothing of it is committed.

Only the holder of the run directory's lease (gptrain.checkpoint.lease) deletes or commits
anything: rank 0 checks it before each of those steps. Storage faults that outlast the
retries, and a full disk, end a save with a StorageError naming the URL (a full disk: the
file being written); the checkpoints committed before are untouched.

Checkpoint collectives run on a process group of their own (gloo, CPU): an async save's
collectives run in a background thread while the training thread all-reduces gradients on
the default group, and two threads must never interleave collectives on one group (the
ranks could pair up different calls). The staged CPU tensors also need a CPU backend, and the
default group is NCCL on GPUs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.utils.hooks import RemovableHandle

from gptrain import storage
from gptrain.checkpoint import commit as commits
from gptrain.checkpoint.checksums import ChecksummingWriter
from gptrain.checkpoint.commit import CheckpointError, FileRecord
from gptrain.checkpoint.lease import RunLease, raise_on_every_rank
from gptrain.checkpoint.store import (
    CONFIG_FILE,
    Checkpointable,
    ReusedCpuStaging,
    TrainProgress,
    read_into,
    read_run_config,
    state_to_save,
    write_run_files,
    write_shards,
)
from gptrain.config import RunConfig, flatten
from gptrain.data.loader import TokenDataset
from gptrain.distributed import any_rank, broadcast_object, current_env
from gptrain.errors import GptrainError

log = logging.getLogger("gptrain.checkpoint")


@dataclass
class SaveReport:
    """How long one save took. `stall_s` is the time training was held up: all of it for a
    synchronous save; for an async one, waiting for the previous save, taking the state dict,
    and the next optimizer step's wait for the copy to CPU memory, if it was not done by then."""

    step: int
    url: str
    asynchronous: bool
    stall_s: float
    total_s: float | None = None  # from start to commit, without waiting for the previous save (None while in flight)
    copy_s: float | None = None  # async: the copy to CPU memory, in the background (overlapping training)

    def metrics_record(self) -> dict[str, object]:
        """The record of a committed save in metrics.jsonl."""
        return {"kind": "checkpoint", "step": self.step, "async": self.asynchronous,
                "stall_s": round(self.stall_s, 4), "write_s": round(self.total_s, 4),
                "copy_s": None if self.copy_s is None else round(self.copy_s, 4), "url": self.url}


@dataclass
class Resumed:
    url: str
    step: int
    tokens_seen: int
    saved_world_size: int
    wandb_run_id: str | None
    skipped: list[str] = field(default_factory=list)  # newer checkpoints that could not be used, and why


class Checkpointer:
    def __init__(self, config: RunConfig, dataset: TokenDataset, device: torch.device, lease: RunLease | None = None):
        """`lease`: the run directory's lease (gptrain.train.trainer.train holds one); without
        it the caller vouches that no other process writes to the run directory."""
        self.config, self.settings = config, config.checkpoint
        self.lease = lease
        self.run_dir = config.train.run_dir
        self.dataset, self.device = dataset, device
        env = current_env()
        self.rank, self.world_size = env.rank, env.world_size
        self.wandb_run_id: str | None = None  # set by the trainer once W&B has started
        self.reports: list[SaveReport] = []
        self.group = dist.new_group(backend="gloo") if dist.is_available() and dist.is_initialized() else None
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight: Future | None = None
        self._staging: ReusedCpuStaging | None = None  # created by the first async save
        self._staged = threading.Event()  # set once the save in flight has copied the state
        self._staged.set()
        self._guard: RemovableHandle | None = None  # optimizer.step's wait for that copy
        self._guarded: torch.optim.Optimizer | None = None
        self._reported = 0  # self.reports[:_reported] went out through finished_saves()
        self._saved_step: int | None = None  # the step of the newest checkpoint of this run's state
        # Nobody may start writing a checkpoint folder while rank 0 may still be deleting one.
        self._on_rank0(self._remove_dead_saves, commits.checkpoints_url(self.run_dir))

    # -----------------------------------------------------------------------------------------
    # Saving.

    def due(self, step: int) -> bool:
        return self.settings.every > 0 and step % self.settings.every == 0

    def save(self, state: Checkpointable, *, blocking: bool | None = None) -> SaveReport | None:
        """Checkpoint `state` at its step (all ranks call this together). Asynchronous when
        checkpoint.async_save is set, unless `blocking`. Returns None when this state is
        already the newest checkpoint (e.g. the final save right after a periodic one)."""
        asynchronous = self.settings.async_save if blocking is None else not blocking
        start = time.perf_counter()
        self.wait()  # at most one save in flight; this also orders the commits by step
        if state.step == self._saved_step:
            return None
        progress = TrainProgress(
            step=state.step, tokens_seen=state.tokens_seen, world_size=self.world_size,
            dataset_fingerprint=self.dataset.fingerprint, wandb_run_id=self.wandb_run_id,
        )
        # The live tensors, and this moment's data position and RNG states as bytes.
        to_save = state_to_save(state, progress, self.rank, self.device)
        self._saved_step = state.step
        report = SaveReport(state.step, commits.step_url(self.run_dir, state.step), asynchronous, stall_s=0.0)
        self.reports.append(report)
        if not asynchronous:
            self._write(to_save, report)
            report.stall_s = report.total_s = time.perf_counter() - start
            self._log_committed(report)
            return report
        if self._staging is None:
            self._staging = ReusedCpuStaging()
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptrain-checkpoint")
        self._guard_optimizer(state.optimizer)
        self._staged.clear()
        self._in_flight = self._executor.submit(self._save_in_background, to_save, report)
        report.stall_s = time.perf_counter() - start
        return report

    def finished_saves(self) -> list[SaveReport]:
        """The saves committed since the last call, oldest first (for metrics.jsonl)."""
        done = [report for report in self.reports[self._reported:] if report.total_s is not None]
        self._reported += len(done)
        return done

    def _write(self, to_save: dict, report: SaveReport) -> None:
        """Steps 2-4 of a save: the folder, every rank's shard, the commit."""
        # Every rank writes into the folder only after rank 0 has cleared it.
        self._on_rank0(lambda: self._prepare_folder(report.url), report.url)
        writer = ChecksummingWriter(report.url)
        with self._faults(writer):
            write_shards(writer, to_save, self.group)
        self._commit(writer, report.step)

    def _save_in_background(self, to_save: dict, report: SaveReport) -> None:
        begin = time.perf_counter()
        try:
            to_save = self._staging.copy(to_save)
        finally:
            self._staged.set()  # training may change the state again (or learn of the failure)
        report.copy_s = time.perf_counter() - begin
        self._write(to_save, report)
        report.total_s = time.perf_counter() - begin
        self._log_committed(report)

    def _guard_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Make `optimizer.step` wait for the copy of the save in flight: the step changes the
        weights and the AdamW moments in place, and nothing else between two steps does (the
        forward and backward only read them), so the copy overlaps with the next step's
        forward and backward, and training stalls only if the copy takes longer than they do."""
        if self._guarded is optimizer:
            return
        if self._guard is not None:
            self._guard.remove()
        self._guarded = optimizer
        self._guard = optimizer.register_step_pre_hook(lambda *_: self._wait_for_staging())

    def _wait_for_staging(self) -> None:
        if self._staged.is_set():
            return
        start = time.perf_counter()
        self._staged.wait()
        self.reports[-1].stall_s += time.perf_counter() - start

    def _remove_dead_saves(self) -> None:
        # At startup no save of this run can be in flight (the lease says no other process
        # writes here): every folder without a marker is left over from a save that died.
        self._check_lease()
        commits.remove_uncommitted(self.run_dir)

    def _prepare_folder(self, url: str) -> None:
        self._check_lease()
        if storage.exists(url):
            # A folder for this step exists only when it is damaged or uncommitted (resume
            # skipped it): stale shards must not mix with the new ones.
            commits.remove_checkpoint(url)
        write_run_files(url, self.config.to_yaml(), self.dataset.tokenizer_spec)

    def _commit(self, writer: ChecksummingWriter, step: int) -> None:
        # Rank 0 has every rank's file records once the gather returns, so every rank has
        # finished writing: only then may the marker claim that the checkpoint is complete.
        written: dict[str, FileRecord] = {}
        for records in self._gather(writer.records):
            written.update(records)
        self._on_rank0(lambda: self._write_marker(writer.url, step, written), writer.url)

    def _write_marker(self, url: str, step: int, written: dict[str, FileRecord]) -> None:
        self._check_lease()
        commits.write_commit(url, step, self.world_size, written)
        # After the commit, not before: until the new checkpoint exists, the old ones are the
        # only way back. Anything uncommitted below this step is a save that failed.
        removed = commits.tidy_after_commit(self.run_dir, step, self.settings.keep_last, self.settings.keep_every)
        if removed:
            log.info("retention: removed %s", ", ".join(removed))

    def _check_lease(self) -> None:
        if self.lease is not None:
            self.lease.check()

    @contextlib.contextmanager
    def _faults(self, writer: ChecksummingWriter) -> Iterator[None]:
        """A failed write as a StorageError when the storage is at fault; a full disk named as
        such even on the ranks that only saw DCP's report of another rank's failure."""
        try:
            yield
        except BaseException as err:
            errors = [writer.write_error]
            if self.group is not None and isinstance(err, CheckpointException):  # DCP raises it on every rank
                errors = self._gather(writer.write_error)
            for cause in [*errors, err]:
                fault = storage.storage_fault(cause, writer.url) if cause is not None else None
                if fault is not None:
                    raise fault from err
            raise

    def _on_rank0(self, action: Callable[[], object], url: str) -> None:
        """Run `action` on rank 0 (a storage fault in it named after `url`); every rank waits
        for it, and raises if it failed."""
        error = None
        if self.rank == 0:
            try:
                with storage.faults_named(url):
                    action()
            except Exception as err:  # noqa: BLE001  (raised on every rank below)
                error = err
        if self.group is None:
            if error is not None:
                raise error
            return
        raise_on_every_rank(error, self.rank == 0, self.group)

    def _gather(self, value):
        """`value` from every rank, in rank order, on every rank (the checkpoint group)."""
        if self.group is None:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.group)
        return values

    def _log_committed(self, report: SaveReport) -> None:
        if self.rank != 0:
            return
        if report.asynchronous:
            log.info(
                "checkpoint step %d committed (async): training stalled %.3f s; copied and written "
                "in the background in %.2f s -> %s",
                report.step, report.stall_s, report.total_s, report.url,
            )
        else:
            log.info("checkpoint step %d committed (sync): training stalled %.3f s -> %s",
                     report.step, report.stall_s, report.url)

    @property
    def in_flight(self) -> bool:
        """Whether an async save is still being written (or committed)."""
        return self._in_flight is not None and not self._in_flight.done()

    def wait(self) -> None:
        """Block until the async save in flight (if any) is committed; re-raises its error."""
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            in_flight.result()

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None
        if self._guard is not None:
            self._guard.remove()
            self._guard = self._guarded = None
        self._staging = None  # frees the CPU copy of the state

    # -----------------------------------------------------------------------------------------
    # Resuming.

    def resume(self, state: Checkpointable) -> Resumed | None:
        """Restore `state` as checkpoint.resume says; None when the run starts fresh.

        auto: the newest committed checkpoint of the run directory. If it cannot be used (a
        truncated shard, a damaged marker, another model's config), the one before, and so
        on, saying so; if the run has checkpoints but none is usable, that is an error:
        starting over would overwrite the run. A URL: that checkpoint folder, which must load,
        or the newest usable checkpoint of that run directory. Starting fresh with
        checkpoint.init_from loads those weights into the model.
        """
        setting = self.settings.resume
        urls: list[str] = []
        if self.rank == 0 and setting == "auto":
            urls = [commit.url for commit in reversed(commits.committed(self.run_dir))]
        elif self.rank == 0 and setting != "none":
            urls = commits.candidates(setting)
        urls = broadcast_object(urls)  # one listing (rank 0's), not one per rank
        skipped: list[str] = []
        for url in urls:
            try:
                resumed = self._load(url, state)
            except CheckpointError as err:
                if len(urls) == 1 and setting != "auto":
                    raise
                skipped.append(str(err))
                if self.rank == 0:
                    log.warning("cannot resume from %s: %s", url, err)
                    log.warning("falling back to the previous committed checkpoint")
                continue
            resumed.skipped = skipped
            if url == commits.step_url(self.run_dir, resumed.step):
                self._saved_step = resumed.step  # this run already has this state committed
            self.wandb_run_id = resumed.wandb_run_id
            if self.rank == 0:
                fell_back = f" (fell back past {len(skipped)} unusable newer checkpoint(s))" if skipped else ""
                log.info("resumed from %s at step %d, %d tokens seen%s",
                         url, resumed.step, resumed.tokens_seen, fell_back)
            return resumed
        if skipped:
            raise CheckpointError(
                f"{commits.checkpoints_url(self.run_dir)}: no committed checkpoint can be loaded:\n  "
                + "\n  ".join(skipped)
                + "\nfix or remove them, or set checkpoint.resume=none with a new train.run_dir"
            )
        if setting != "none" and setting != "auto" and not urls:
            raise CheckpointError(f"checkpoint.resume={setting!r}: that run directory has no committed checkpoint")
        if self.settings.init_from:
            load_initial_weights(state.model, self.settings.init_from)
        return None

    def _load(self, url: str, state: Checkpointable) -> Resumed:
        # Rank 0 checks the marker, the file sizes and the config, and tells everyone: the ranks
        # must take the same decision, or some would enter DCP's collectives and wait forever.
        problem, commit = None, None
        if self.rank == 0:
            try:
                commit = commits.read_commit(url)
                commits.verify_sizes(commit)
                self._check_config(url)
            except CheckpointError as err:
                problem = str(err)
        problem, commit = broadcast_object((problem, commit))
        if problem is not None:
            raise CheckpointError(problem)
        # Silent corruption (a flipped byte, same size) shows only in the sha256s, which read
        # every byte: each rank checks its share of the files.
        try:
            commits.verify_checksums(commit, self.rank, self.world_size)
        except CheckpointError as err:
            problem = str(err)
        problem = next((p for p in self._gather(problem) if p is not None), None)
        if problem is not None:
            raise CheckpointError(problem)
        failure = None
        try:
            progress = read_into(
                url, state, rank=self.rank, saved_world_size=commit.world_size,
                dataset_fingerprint=self.dataset.fingerprint, device=self.device, process_group=self.group,
            )
        except CheckpointError as err:
            failure = str(err)
        # A blob that one rank alone could not decode must stop every rank the same way.
        if any_rank(failure is not None):
            raise CheckpointError(failure or f"{url}: another rank could not read its part")
        if progress.step != commit.step:  # the same blob on every rank: all raise
            raise CheckpointError(f"{url}: the saved state is at step {progress.step}, but {commit.marker_url} "
                                  f"says {commit.step}: the checkpoint is damaged")
        if self.rank == 0 and commit.world_size != self.world_size:
            log.warning(
                "resuming a %d-rank checkpoint with %d rank(s): the data position carries over exactly; "
                "ranks without a saved RNG state keep their fresh seeds", commit.world_size, self.world_size,
            )
        return Resumed(url, progress.step, progress.tokens_seen, commit.world_size, progress.wandb_run_id)

    def _check_config(self, url: str) -> None:
        """The checkpoint must hold this run's model; other config changes are reported."""
        saved = read_run_config(url)
        saved_model, model = saved.model.resolve(), self.config.model.resolve()
        if saved_model != model:
            diffs = [
                f"{key}: checkpoint {value!r}, this run {model.to_dict()[key]!r}"
                for key, value in saved_model.to_dict().items() if model.to_dict()[key] != value
            ]
            config_url = storage.join(url, CONFIG_FILE)
            raise CheckpointError(f"{config_url} describes a different model than this run's ({'; '.join(diffs)})")
        old, new = flatten(saved.to_dict()), flatten(self.config.to_dict())
        changed = [f"{key} {old.get(key)!r} -> {value!r}" for key, value in new.items() if old.get(key) != value]
        if changed:
            log.info("config changed since %s: %s", url, "; ".join(changed))


def load_initial_weights(model: torch.nn.Module, url: str) -> None:
    """checkpoint.init_from: copy pretrained weights (an HF folder, a gptrain run or checkpoint)
    into a freshly built model of the same architecture."""
    from gptrain.models.weights import load_pretrained

    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    pretrained = load_pretrained(url)
    try:
        # Full tensors in; an FSDP-sharded model keeps this rank's shard of each.
        set_model_state_dict(model, pretrained.state_dict(), options=StateDictOptions(full_state_dict=True))
    except RuntimeError as err:  # missing/unexpected keys or other shapes
        raise GptrainError(f"checkpoint.init_from={url!r}: the weights do not fit this run's model: {err}") from err
    log.info("initialized the model from %s", url)
