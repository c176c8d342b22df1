"""The ``efla`` command line: one subcommand per job, each a module of ``efla.commands``.

Each command module exposes ``add_arguments(parser)`` and ``run(args)``; it is imported only when its subcommand
runs, so ``efla --help`` stays fast.

Errors: a command raises ``efla.commands.CommandError``; ``main`` prints it as one line, ``efla CMD: error:
MESSAGE``, without a traceback, and exits with its code. Exit codes of every command:

    0    success
    1    the work started but did not finish: a diverged loss, out of memory, a failed run of a sweep
    2    usage error: a bad argument, a missing or unreadable input, an output that would be overwritten, a device
         this machine lacks (the message says what to change; argparse's own errors give 2 too)
    130  interrupted by Ctrl-C (128 + SIGINT); ``efla train`` stopped by SIGTERM gives 128 + 15 = 143, after saving
         a checkpoint to resume from
"""

from __future__ import annotations

import argparse
import importlib
import sys

from efla.commands import INTERRUPTED, CommandError

COMMANDS: dict[str, tuple[str, str]] = {
    "smnist": ("efla.commands.smnist", "sequential-MNIST robustness study, EFLA vs DeltaNet"),
    "mqar": ("efla.commands.mqar", "multi-query associative recall (Zoology's MQAR), EFLA vs DeltaNet"),
    "exactness": ("efla.commands.exactness", "error of EFLA, Euler, RK2 and RK4 against the matrix exponential"),
    "compare-lm": ("efla.commands.compare_lm", "the paper's language-model comparison, EFLA vs DeltaNet: held-out "
                                               "perplexity over learning rates and seeds"),
    "train": ("efla.commands.train", "train an EFLA language model (one process, or DDP/FSDP2 under torchrun)"),
    "tokenizer": ("efla.commands.tokenizer", "efla tokenizer train: a byte-level BPE tokenizer from local text"),
    "eval": ("efla.commands.eval", "efla eval ppl | harness: perplexity on held-out text, lm-evaluation-harness tasks"),
    "generate": ("efla.commands.generate", "continue a prompt with a saved model and report tokens/s"),
    "convert": ("efla.commands.convert", "fla (Gated) DeltaNet checkpoint <-> EFLA checkpoint (same outputs in delta "
                                         "mode)"),
}


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
