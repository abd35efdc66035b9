"""python -m jobs preprocess|pretrain|sweep --cluster slurm|local|debug ...

Submits gptrain's pipeline with submitit; every command takes the same resource options.
Prints one "STAGE JOBID" line per job (a job array: its tasks' ids), like slurm/submit.sh.
On Slurm it returns once the jobs are queued (chain them with --after JOBID); with --wait,
and always on the local and debug clusters, it waits for them and prints their results.

    python -m jobs preprocess --cluster slurm --mirror rsync://aleph.gutenberg.org/gutenberg-epub --tasks 8
    python -m jobs pretrain --cluster slurm --nodes 2 --tasks-per-node 8 --gpus-per-node 8 \\
        --after FINALIZE_JOBID --config gpt2-124m-gutenberg data.path=data/gutenberg
    python -m jobs sweep --cluster slurm --array-parallelism 4 debug-4 data.path=data/gutenberg
"""

from __future__ import annotations

import argparse
import shlex
import sys

import submitit

from gptrain.data.download import SUGGESTED_MIRROR
from gptrain.errors import EXIT_BAD_INPUT, EXIT_CRASH, EXIT_OK, GptrainError
from jobs.resources import CLUSTERS, Resources
from jobs.submit import submit_preprocess, submit_pretrain, submit_sweep


def _common_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    where = parser.add_argument_group("where")
    where.add_argument("--cluster", choices=CLUSTERS, default="slurm",
                       help="slurm (sbatch), local (processes on this machine) or debug (in this process) "
                       "(default: %(default)s)")
    where.add_argument("--folder", default="runs/submitit/%j",
                       help="submitit's folder for pickles and logs; %%j is the job id (default: %(default)s)")
    where.add_argument("--after", action="append", default=[], metavar="JOBID",
                       help="start once this Slurm job (array: all its tasks) has succeeded; repeatable")
    where.add_argument("--wait", action="store_true", help="wait for the jobs and print their results")
    res = parser.add_argument_group("resources (per job; array tasks get one process on one node)")
    defaults = Resources()
    res.add_argument("--nodes", type=int, default=defaults.nodes)
    res.add_argument("--tasks-per-node", type=int, default=defaults.tasks_per_node,
                     help="processes per node, one per GPU when training (default: %(default)s)")
    res.add_argument("--gpus-per-node", type=int, default=defaults.gpus_per_node)
    res.add_argument("--cpus-per-task", type=int, default=defaults.cpus_per_task)
    res.add_argument("--mem-gb", type=float, default=defaults.mem_gb, help="default: the partition's")
    res.add_argument("--timeout-min", type=int, default=defaults.timeout_min)
    res.add_argument("--partition", default=defaults.partition)
    res.add_argument("--signal-delay-s", type=int, default=defaults.signal_delay_s,
                     help="seconds before the time limit that the job is warned, to checkpoint (default: %(default)s)")
    res.add_argument("--max-num-timeout", type=int, default=defaults.max_num_timeout,
                     help="times a job that reached its time limit is requeued; preemptions do not count "
                     "(default: %(default)s)")
    res.add_argument("--array-parallelism", type=int, default=defaults.array_parallelism,
                     help="array tasks running at once (default: %(default)s)")
    res.add_argument("--slurm-option", action="append", default=[], metavar="KEY=VALUE", dest="slurm_options",
                     help="any other sbatch option, e.g. account=proj or qos=high; repeatable")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs", description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="examples:\n" + __doc__.split("\n\n")[2],
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = [_common_options()]

    pre = commands.add_parser("preprocess", parents=common,
                              help="download+prepare job array, then the finalize job")
    # An array downloads in bulk, which Project Gutenberg asks to go through its rsync mirror.
    pre.add_argument("--mirror", default=SUGGESTED_MIRROR,
                     help="rsync mirror, folder, fsspec URL or http(s) mirror (default: %(default)s)")
    pre.add_argument("--raw", default="data/raw", help="raw books folder or URL (default: %(default)s)")
    pre.add_argument("--dataset", default="data/gutenberg", help="dataset folder or URL (default: %(default)s)")
    pre.add_argument("--tasks", type=int, default=4, help="array tasks (default: %(default)s)")
    pre.add_argument("--download-args", default="", type=shlex.split,
                     help='more `gptrain data download` options, e.g. "--limit 100"')
    pre.add_argument("--prepare-args", default="", type=shlex.split,
                     help='more `gptrain data prepare` options, e.g. "--val-fraction 0.05"')

    pre_train = commands.add_parser("pretrain", parents=common,
                                    help="`gptrain train` on nodes x tasks-per-node processes; requeued on preemption")
    pre_train.add_argument("--config", default="gpt2-124m-gutenberg", help="preset or YAML file (default: %(default)s)")
    pre_train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.path=DATASET")

    sweep = commands.add_parser("sweep", parents=common, help="a sweep's trials as a job array")
    sweep.add_argument("spec", metavar="SPEC", help="a shipped sweep spec (gptrain/sweeps/) or a YAML file/URL")
    sweep.add_argument("--sweep-dir", help="the sweep folder (default: the spec's sweep_dir)")
    sweep.add_argument("--trial", type=int, action="append", dest="trials", metavar="I",
                       help="run only this trial; repeatable (default: every trial of the spec)")
    sweep.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="config overrides for every trial, e.g. data.path=DATASET")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        resources = Resources(
            nodes=args.nodes, tasks_per_node=args.tasks_per_node, gpus_per_node=args.gpus_per_node,
            cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb, timeout_min=args.timeout_min,
            partition=args.partition, signal_delay_s=args.signal_delay_s, max_num_timeout=args.max_num_timeout,
            array_parallelism=args.array_parallelism, slurm_options=tuple(args.slurm_options),
        )
        where = dict(cluster=args.cluster, folder=args.folder, resources=resources, after=args.after)
        if args.command == "preprocess":
            array, finalize_job = submit_preprocess(
                **where, mirror=args.mirror, raw=args.raw, dataset=args.dataset, num_tasks=args.tasks,
                download_args=args.download_args, prepare_args=args.prepare_args,
            )
            stages = [("preprocess", array), ("finalize", [finalize_job])]
        elif args.command == "pretrain":
            stages = [("pretrain", [submit_pretrain(**where, config=args.config, overrides=args.overrides)])]
        else:
            jobs = submit_sweep(
                **where, spec=args.spec, overrides=args.overrides, sweep_dir=args.sweep_dir, trials=args.trials
            )
            stages = [("sweep", jobs)]
    except GptrainError as err:
        print(f"python -m jobs {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for stage, jobs in stages:
        print(stage, " ".join(job.job_id for job in jobs), flush=True)
    if args.wait or args.cluster != "slurm":
        return _report(stages)
    return EXIT_OK


def _report(stages: list[tuple[str, list[submitit.Job]]]) -> int:
    status = EXIT_OK
    for stage, jobs in stages:
        for job in jobs:
            try:
                # A job of several tasks (pretraining ranks) has one result per task: rank 0's here.
                print(f"{stage} {job.job_id} result: {job.results()[0]!r}", flush=True)
            except Exception as err:  # the job's exception, re-raised here by submitit
                print(f"{stage} {job.job_id} failed: {err}", file=sys.stderr, flush=True)
                status = EXIT_CRASH
    return status


if __name__ == "__main__":
    sys.exit(main())
