"""`gptrain sweep`: plan, run and report hyperparameter sweeps.

    gptrain sweep plan debug-4 data.path=DATASET                  list the trials (checks every config)
    gptrain sweep run debug-4 --index 2 data.path=DATASET         train trial 2 (skipped when done)
    gptrain sweep run debug-4 --all data.path=DATASET             every trial in turn, in this process
    gptrain sweep report runs/sweeps/debug-4                      report.md/.csv, plots, best_config.yaml

SPEC is a shipped spec (gptrain/sweeps/NAME.yaml, without .yaml) or a YAML file/URL; KEY=VALUE
overrides apply to every trial's config. Every task of one sweep must get the same SPEC and
overrides: the sweep folder refuses a plan that differs from the one it holds.

Job arrays: without --index, the trial is the array task's index (gptrain.array_task: Slurm's
SLURM_ARRAY_TASK_ID, so --array=0-(N-1)%K runs every trial and --array=3,7 reruns two; a
Kubernetes Indexed Job's JOB_COMPLETION_INDEX). `gptrain sweep plan SPEC --count` prints N.
Exit status of run (gptrain.errors): 0 trained or already done, 75 preempted (checkpoint
saved; rerun to resume), 2 bad input, anything else a crash.
"""

from __future__ import annotations

import argparse

from gptrain.cli import add_documented_command


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_documented_command(
        subparsers,
        "sweep",
        "hyperparameter sweeps: plan trials, run one (job arrays) or all, report the results",
        __doc__,
    )
    commands = parser.add_subparsers(
        dest="sweep_command", metavar="SUBCOMMAND", required=True, parser_class=_IntermixedParser
    )

    plan = commands.add_parser("plan", help="list the trials of a spec; checks every trial's config")
    _spec_arguments(plan)
    plan.add_argument("--count", action="store_true", help="print only the number of trials")
    plan.set_defaults(func=plan_command)

    run = commands.add_parser("run", help="train one trial (or all): skips done trials, resumes preempted ones")
    _spec_arguments(run)
    which = run.add_mutually_exclusive_group()
    which.add_argument("--index", type=int, metavar="I",
                       help="the trial to run; default: the job array task's index (0 outside arrays)")
    which.add_argument("--all", action="store_true", help="run every trial in turn in this process")
    run.set_defaults(func=run_command, trains=True)

    report = commands.add_parser("report", help="tables, plots and the best config of a sweep folder")
    report.add_argument("sweep_dir", metavar="SWEEP_DIR", help="the sweep folder or URL")
    report.add_argument("--top", type=int, default=5, metavar="K", help="loss curves of the K best trials (default 5)")
    report.set_defaults(func=report_command)


class _IntermixedParser(argparse.ArgumentParser):
    """Options may come after the positionals, as in `run SPEC --index 2 KEY=VALUE`: a plain
    parser gives SPEC and the (empty) overrides the first chunk and rejects KEY=VALUE."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        # parse_known_intermixed_args calls parse_known_args itself (twice): only the outer call switches.
        if self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="SPEC", help="a shipped sweep spec (gptrain/sweeps/) or a YAML file/URL")
    parser.add_argument("--sweep-dir", metavar="URL", help="the sweep folder (default: the spec's sweep_dir)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides for every trial, e.g. data.path=DATASET")


def _open(args: argparse.Namespace, write: bool):
    from gptrain.sweep.plan import open_spec

    return open_spec(args.spec, args.overrides, args.sweep_dir, write=write)


def plan_command(args: argparse.Namespace) -> int:
    plan = _open(args, write=False)
    if args.count:
        print(len(plan.trials))
        return 0
    print(f"sweep {plan.name}: {plan.summary}")
    print(f"sweep folder: {plan.sweep_dir}")
    for trial in plan.trials:
        print(f"{trial.index:>5}  {trial.id}  {trial.describe()}")
    return 0


def run_command(args: argparse.Namespace) -> int:
    from gptrain.array_task import resolve_array_task
    from gptrain.sweep.run import run_all, run_trial

    plan = _open(args, write=True)
    if args.all:
        return run_all(plan)
    index = args.index if args.index is not None else resolve_array_task(count=len(plan.trials)).index
    return run_trial(plan, index)


def report_command(args: argparse.Namespace) -> int:
    from gptrain.sweep.report import markdown, write_report

    report = write_report(args.sweep_dir, top=args.top)
    print(markdown(report), end="")
    print(f"wrote {', '.join(report.files)} in {args.sweep_dir}")
    return 0
