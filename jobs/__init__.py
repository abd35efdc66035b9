"""gptrain's pipeline as submitit jobs: `python -m jobs preprocess|pretrain|sweep` (see __main__.py).

    resources.py  Resources (one description of a job's compute) and the submitit executor
    tasks.py      what runs in the jobs: gptrain commands, the requeueable pretraining callable
    submit.py     submit_preprocess / submit_pretrain / submit_sweep, chained with `after`

The same pipeline as slurm/*.sbatch, from Python: the jobs call gptrain in their own process
instead of a shell script, and submitit requeues a preempted pretraining job itself.
"""

from jobs.resources import Resources
from jobs.submit import submit_preprocess, submit_pretrain, submit_sweep

__all__ = ["Resources", "submit_preprocess", "submit_pretrain", "submit_sweep"]
