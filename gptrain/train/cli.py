"""`gptrain train`: pretrain a model from a preset or YAML config, with key=value overrides.

    gptrain train --config debug data.path=DATASET train.run_dir=runs/debug
    gptrain launch --nproc-per-node=8 -- train --config gpt2-124m-gutenberg data.path=s3://bucket/gutenberg
"""

from __future__ import annotations

import argparse

from gptrain.cli import add_documented_command


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_documented_command(
        subparsers,
        "train",
        "pretrain a model (one process, or each rank under gptrain launch/srun/Kubernetes/torchrun)",
        __doc__,
    )
    parser.add_argument("--config", required=True, metavar="NAME_OR_FILE",
                        help="a shipped preset (a file name in gptrain/presets/, without .yaml) or a YAML file/URL")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides such as data.path=DATASET train.max_steps=200 optim.lr=3e-4")
    parser.set_defaults(func=run_train, trains=True)


def run_train(args: argparse.Namespace) -> int:
    from gptrain.config import load_config
    from gptrain.errors import EXIT_OK, EXIT_PREEMPTED
    from gptrain.train.trainer import train

    summary = train(load_config(args.config, args.overrides))
    return EXIT_PREEMPTED if summary.get("preempted") else EXIT_OK
