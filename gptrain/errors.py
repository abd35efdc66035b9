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
"""

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75


class GptrainError(ValueError):
    """Bad input: the message names the file, key or value at fault. Exits EXIT_BAD_INPUT."""


class StorageError(RuntimeError):
    """A storage call that still failed after its retries, or a full disk: the message names the
    URL or path and the error in one line. Exits EXIT_CRASH: a rerun may well succeed."""
