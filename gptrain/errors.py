"""Errors, and the exit-status contract every gptrain command and launcher keeps.

One contract, end to end: a scheduler (Slurm, Kubernetes, submitit, `docker run`) sees the
status of the gptrain process itself, whatever starts it, and acts on it:

    0   EXIT_OK          done
    2   EXIT_BAD_INPUT   bad configuration or input; the message names the file, key or value.
                         Never retried: the same input fails the same way.
    75  EXIT_PREEMPTED   stopped early by a signal after committing a checkpoint (EX_TEMPFAIL
                         from sysexits.h): requeue or restart it and it resumes. Not a failure.
    anything else        a crash (1 for an error gptrain did not expect or a storage fault that
                         outlasted its retries, 128+N for death by signal N): retried within the
                         scheduler's bounds, resuming from the newest committed checkpoint.

Every launch path passes the status on unchanged: `gptrain launch` (the first failing
worker's status, else 75 if the workers were preempted), the Slurm batch scripts (which
requeue the job on 75), submitit's jobs (requeued through submitit on 75), the Kubernetes
Jobs' podFailurePolicy rules and tini in the container image. README.md ("Exit status")
describes what each scheduler does with it.
"""

import signal

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75


class GptrainError(ValueError):
    """Bad input: the message names the file, key or value at fault. Exits EXIT_BAD_INPUT."""


class StorageError(RuntimeError):
    """A storage call that still failed after its retries, or a full disk: the message names the
    URL or path and the error in one line. Exits EXIT_CRASH: a rerun may well succeed."""


def exit_status(returncode: int) -> int:
    """A child's `subprocess` return code as the status a shell reports: -N (killed by signal
    N) becomes 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def describe_status(status: int) -> str:
    """'exited with status 2 (bad input)', 'was killed by SIGKILL (status 137)', ..."""
    if status > 128 and status - 128 in signal.Signals._value2member_map_:
        return f"was killed by {signal.Signals(status - 128).name} (status {status})"
    meaning = {EXIT_OK: "done", EXIT_BAD_INPUT: "bad input", EXIT_PREEMPTED: "preempted"}.get(status, "crash")
    return f"exited with status {status} ({meaning})"
