"""``efla exactness`` end to end on a small configuration: files written, and the numbers say what the study claims."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from efla.cli import main


def _tables(markdown: str) -> list[tuple[list[str], list[list[str]]]]:
    """(header, rows) of the markdown table under each ### heading, in order."""
    tables = []
    for section in markdown.split("### ")[1:]:
        lines = [line for line in section.splitlines() if line.startswith("|")]
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
        tables.append((rows[0], [r for r in rows[1:] if not r[0].startswith("---")]))
    return tables


def test_exactness_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["exactness", "--out", str(tmp_path), "--dim", "4", "--batch", "2", "--stiffness", "0.01", "0.1", "1", "10",
          "--substeps", "4", "8", "16", "32", "--order-length", "3", "--lengths", "1", "30",
          "--length-stiffness", "0.5", "3", "--seed", str(random.randrange(2**31))])
    printed = capsys.readouterr().out
    table = (tmp_path / "table.md").read_text()
    assert table in printed
    assert (tmp_path / "exactness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    (stiff_header, stiff), (conv_header, conv), (len_header, lengths) = _tables(table)
    assert stiff_header == ["beta*lam", "euler", "rk2", "rk4", "efla"]
    assert [float(r[0]) for r in stiff] == [0.01, 0.1, 1, 10]
    euler = [float(r[1]) for r in stiff]
    assert euler == sorted(euler) and euler[-1] > 1  # Euler's error grows with the step; unstable past 2
    assert all(float(r[4]) < 1e-13 for r in stiff)  # EFLA at float64 round-off at every stiffness

    assert conv_header == ["n", "h*lam", "euler", "rk2", "rk4", "efla"]
    *rows, order = conv
    assert [int(r[0]) for r in rows] == [4, 8, 16, 32]
    for column in (2, 3, 4):
        errors = [float(r[column]) for r in rows]
        assert errors == sorted(errors, reverse=True)
    assert order[0] == "order (fit)" and order[5] == "exact"
    for column, expected in ((2, 1), (3, 2), (4, 4)):
        assert float(order[column]) == pytest.approx(expected, abs=0.2)
    assert all(float(r[5]) < 1e-13 for r in rows)

    assert len_header == ["beta*lam", "T", "euler", "rk2", "rk4", "efla"]
    by_key = {(float(r[0]), int(r[1])): [float(c) for c in r[2:]] for r in lengths}
    assert set(by_key) == {(0.5, 1), (0.5, 30), (3.0, 1), (3.0, 30)}
    assert all(errors[3] < 1e-13 for errors in by_key.values())
    assert all(math.isfinite(e) for errors in by_key.values() for e in errors)
    assert by_key[3.0, 30][0] > 10 * by_key[3.0, 1][0]  # stiff: Euler's error compounds along the sequence
