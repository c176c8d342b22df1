"""``run_efla``: the ``efla`` command run in the test's own process, for the command tests of every package."""

from __future__ import annotations

from efla.cli import main


def run_efla(argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``efla ARGV`` in this process (0 when it returns)."""
    try:
        main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
