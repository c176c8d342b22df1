"""The ``efla`` command line: one subcommand per job, each a thin layer over library functions.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``; the module's docstring
gives the help line. Modules are imported only when their subcommand runs, so ``efla --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "smnist": ("efla.experiments.smnist.cli", "sequential-MNIST robustness study, EFLA vs DeltaNet (the main job)"),
    "mqar": ("efla.experiments.mqar.cli", "multi-query associative recall (Zoology's MQAR), EFLA vs DeltaNet"),
    "exactness": ("efla.experiments.exactness", "error of EFLA, Euler, RK2 and RK4 against the matrix exponential"),
    "train": ("efla.train.cli", "train an EFLA language model (one process, or DDP/FSDP2 under torchrun)"),
    "tokenizer": ("efla.train.tokenizer_cli", "efla tokenizer train: a byte-level BPE tokenizer from local text"),
    "eval": ("efla.eval.cli", "efla eval ppl | harness: perplexity on held-out text, lm-evaluation-harness tasks"),
}


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the chosen subcommand."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="efla", description="Error-Free Linear Attention: experiments and tools.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, summary) in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    if chosen is None:
        parser.parse_args(argv)  # prints usage or the error for an unknown command
        return
    module = importlib.import_module(COMMANDS[chosen][0])
    sub = argparse.ArgumentParser(prog=f"efla {chosen}", description=COMMANDS[chosen][1])
    module.add_arguments(sub)
    module.run(sub.parse_args(argv[1:]))


if __name__ == "__main__":
    main()
