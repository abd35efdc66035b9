"""The `gptrain` console script: one subcommand per concern.

Every command exits by the contract in gptrain.errors: 0 done, 2 bad input (GptrainError,
a missing file, argparse's usage errors), 75 preempted, anything else a crash.

Each command module exposes `register(subparsers)`, which adds its parser and sets
`func` to a callable taking the parsed arguments and returning an exit status. Modules
are imported only when listed here, so `gptrain --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from gptrain.errors import EXIT_BAD_INPUT, EXIT_CRASH, GptrainError, StorageError

# Command modules in pipeline order, which is the order `gptrain --help` lists them in.
COMMAND_MODULES = [
    "gptrain.data.cli",
    "gptrain.train.cli",
    "gptrain.train.plan",
    "gptrain.launch",
    "gptrain.status",
    "gptrain.sweep.cli",
    "gptrain.checkpoint.export",
    "gptrain.models.cli",
    "gptrain.chat.cli",
    "gptrain.tokenizer",
    "gptrain.bench.cli",
]


def add_documented_command(subparsers: argparse._SubParsersAction, name: str, help: str, module_doc: str):
    """Add subcommand `name` whose --help is its module's docstring: the first paragraph as the
    description, the rest (usage examples, then notes) verbatim below "examples:"."""
    summary, _, examples = module_doc.partition("\n\n")
    return subparsers.add_parser(
        name, help=help, description=summary, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + examples,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptrain",
        description="Pretrain GPT-2 and Llama-style models on Project Gutenberg.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        if getattr(args, "trains", False):  # set by the commands that train (gptrain.checkpoint.preemption)
            from gptrain.checkpoint.preemption import preemption_signals_recorded

            # The console script (no argv) exits next; a caller in Python gets its handlers back.
            with preemption_signals_recorded(restore=argv is not None):
                return int(args.func(args) or 0)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (GptrainError, FileNotFoundError) as err:
        print(f"gptrain {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StorageError as err:
        print(f"gptrain {args.command}: storage error: {err}", file=sys.stderr)
        return EXIT_CRASH


if __name__ == "__main__":
    sys.exit(main())
