"""The ``efla`` subcommands, one module each (``efla.commands.train`` is ``efla train``), and what they share.

Each module exposes ``add_arguments(parser)`` and ``run(args)``: it parses, checks, calls library code of
``efla.train``, ``efla.eval`` or ``efla.experiments``, and prints. ``efla.cli`` dispatches to them. A command reports
a problem by raising ``CommandError``; it never prints an error and exits by itself.
"""

from __future__ import annotations

SUCCESS = 0
UNFINISHED = 1  # the work started but did not finish: a diverged loss, out of memory, a failed run of a sweep
USAGE_ERROR = 2  # argparse's code for a bad command line; also a missing or unreadable input
INTERRUPTED = 128 + 2  # 128 + SIGINT, as a shell reports a Ctrl-C


class CommandError(Exception):
    """A command's error, shown as one line without a traceback; ``code``: the exit status (USAGE_ERROR by default,
    UNFINISHED for work that did not finish, 128 + a signal for a run a signal stopped)."""

    def __init__(self, message: str, code: int = USAGE_ERROR) -> None:
        super().__init__(message)
        self.code = code


def missing_extra(error: ImportError, extra: str) -> CommandError:
    """The usage error for a package of an optional extra that is not installed."""
    name = getattr(error, "name", None) or str(error)
    return CommandError(f"this command needs the package {name!r} of the {extra!r} extra: pip install 'efla[{extra}]' "
                        f"(or pip install -e '.[{extra}]' in a clone)")
