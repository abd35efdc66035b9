"""Running one trial of a sweep: skip it when done, else train it (resuming from its checkpoint).

The trainer runs in this process, so a trial behaves exactly like `gptrain train`: under
a launcher every rank runs it, preemption signals lead to a checkpoint and the preempted exit
status, and a rerun of a trial whose folder holds checkpoints resumes from the newest
(checkpoint.resume: auto).

Rank 0 keeps the trial's record in TRIAL_DIR/trial.json: its status and one entry per
attempt (start, end, outcome, host) and, once done, the trainer's summary. The status is
"running" while an attempt is under way (or after one was killed or interrupted), "preempted"
after a signal stopped it at a checkpoint, "failed" after an error, "done" at the end; only
"done" trials are skipped.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from gptrain import storage
from gptrain.errors import EXIT_OK, EXIT_PREEMPTED, GptrainError
from gptrain.sweep.plan import SweepPlan, Trial

log = logging.getLogger("gptrain.sweep")

TRIAL_FILE = "trial.json"


def read_trial_record(plan: SweepPlan, trial: Trial) -> dict[str, Any] | None:
    url = storage.join(plan.trial_url(trial), TRIAL_FILE)
    if not storage.exists(url):
        return None
    try:
        return storage.read_json(url)
    except ValueError as err:
        raise GptrainError(f"{url}: {err}") from err


def run_trial(plan: SweepPlan, index: int) -> int:
    """Train trial `index` unless it is done; returns the process exit status."""
    from gptrain.distributed import is_main
    from gptrain.train.trainer import train

    trial = plan.trial(index)
    url = plan.trial_url(trial)
    record = read_trial_record(plan, trial)
    if record is not None and record["status"] == "done":
        log.info("trial %d (%s) is done already (validation loss %s): skipping %s",
                 index, trial.id, record["summary"].get("val_loss"), url)
        return 0
    config = plan.trial_config(trial)
    main_rank = is_main()  # only rank 0 writes the trial record
    attempts = [] if record is None else record["attempts"]
    attempt = {"started_at": time.time(), "ended_at": None, "outcome": None, "host": socket.gethostname()}
    record = {"index": index, "id": trial.id, "params": trial.params, "status": "running",
              "attempts": [*attempts, attempt], "summary": None, "error": None}
    resuming = f" (attempt {len(attempts) + 1}, resuming from its checkpoint if any)" if attempts else ""
    log.info("sweep %s, trial %d of %d (%s): %s -> %s%s",
             plan.name, index, len(plan.trials), trial.id, trial.describe(), url, resuming)

    def save() -> None:
        if main_rank:
            storage.write_json_atomic(storage.join(url, TRIAL_FILE), record)

    def finish(status: str, **fields: Any) -> None:
        attempt.update(ended_at=time.time(), outcome=status)
        record.update(status=status, **fields)
        save()

    save()
    try:
        summary = train(config)
    except Exception as err:
        # (An interrupt or kill leaves the status at "running": the next attempt resumes.)
        finish("failed", error=f"{type(err).__name__}: {err}")
        raise
    if summary.get("preempted"):
        finish("preempted", summary=summary)
        log.info("trial %d (%s) preempted at step %d: rerun it to resume", index, trial.id, summary["steps"])
        return EXIT_PREEMPTED
    finish("done", summary=summary)
    log.info("trial %d (%s) done: validation loss %s", index, trial.id, summary.get("val_loss"))
    return EXIT_OK


def run_all(plan: SweepPlan) -> int:
    """Every trial in turn in this process (laptops, one-node debugging); stops at the first
    that does not finish, returning its status."""
    for trial in plan.trials:
        status = run_trial(plan, trial.index)
        if status != 0:
            return status
    return 0
