"""The ``efla`` command line: one subcommand per job, each a thin layer over library functions.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``; the module's docstring
gives the help line. Modules are imported only when their subcommand runs, so ``efla --help`` stays fast.

Errors: a subcommand raises ``CommandError``; ``main`` prints it as one line, ``efla CMD: error: MESSAGE``, and exits
with its code: 2 for a usage error (a bad argument, a missing or unreadable input: the message says what to change,
as argparse does), 1 (or 128 + the signal) for work that did not finish.
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
    "generate": ("efla.generate_cli", "continue a prompt with a saved model and report tokens/s"),
    "convert": ("efla.convert_cli", "fla (Gated) DeltaNet checkpoint <-> EFLA checkpoint (same outputs in delta mode)"),
}


USAGE_ERROR = 2  # argparse's exit code for a bad command line
INTERRUPTED = 128 + 2  # 128 + SIGINT, as a shell reports a Ctrl-C


class CommandError(Exception):
    """A subcommand's error, shown as one line without a traceback; ``code``: the exit status."""

    def __init__(self, message: str, code: int = USAGE_ERROR) -> None:
        super().__init__(message)
        self.code = code


def missing_extra(error: ImportError, extra: str) -> CommandError:
    """The usage error for a package of an optional extra that is not installed."""
    name = getattr(error, "name", None) or str(error)
    return CommandError(f"this command needs the package {name!r} of the {extra!r} extra: pip install 'efla[{extra}]' "
                        f"(or pip install -e '.[{extra}]' in a clone)")


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the chosen subcommand."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="efla", description="Error-Free Linear Attention: experiments and tools.",
                                     allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, summary) in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    if chosen is None:
        parser.parse_args(argv)  # prints usage or the error for an unknown command
        return
    module = importlib.import_module(COMMANDS[chosen][0])
    sub = argparse.ArgumentParser(prog=f"efla {chosen}", description=COMMANDS[chosen][1], allow_abbrev=False)
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    try:
        module.run(args)
    except CommandError as error:
        action = getattr(args, "action", None)
        print(f"{sub.prog}{' ' + action if action else ''}: error: {error}", file=sys.stderr)
        raise SystemExit(error.code) from None
    except KeyboardInterrupt:  # Ctrl-C: one line and 128 + SIGINT, not a traceback (efla train stops on its own)
        out = getattr(args, "out", None)
        kept = f"; what finished before it is kept in {out}" if out is not None else ""
        print(f"{sub.prog}: interrupted{kept}", file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None


if __name__ == "__main__":
    main()
