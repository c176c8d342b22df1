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
          "--length-stiffness", "0.5", "3", "--decay", "0", "0.1", "3", "--gated-stiffness", "0.1", "10",
          "--gated-length", "20", "--seed", str(random.randrange(2**31))])
    printed = capsys.readouterr().out
    table = (tmp_path / "table.md").read_text()
    assert table in printed
    for image in ("exactness.png", "gated.png"):
        assert (tmp_path / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    (stiff_header, stiff), (conv_header, conv), (len_header, lengths), *gated = _tables(table)
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

    (one_step_header, one_step), (sequence_header, sequence) = gated
    methods = ["euler", "rk2", "rk4", "gated delta", "efla"]
    assert one_step_header == sequence_header == ["beta*lam", "-g", *methods]
    one_step = {(float(r[0]), float(r[1])): dict(zip(methods, map(float, r[2:]), strict=True)) for r in one_step}
    sequence = {(float(r[0]), float(r[1])): dict(zip(methods, map(float, r[2:]), strict=True)) for r in sequence}
    assert set(one_step) == {(x, d) for x in (0.1, 10.0) for d in (0.0, 0.1, 3.0)}
    assert set(sequence) == {(x, d) for x in (0.5, 3.0) for d in (0.0, 0.1, 3.0)}
    assert all(errors["efla"] < 1e-13 for errors in (*one_step.values(), *sequence.values()))  # gated EFLA: exact
    for x in (0.1, 10.0):  # without decay Gated DeltaNet is DeltaNet, i.e. Euler
        assert one_step[x, 0.0]["gated delta"] == pytest.approx(one_step[x, 0.0]["euler"], rel=1e-2)
    # Gated DeltaNet writes beta k v^T where the exact step writes beta phi(beta lam - g) k v^T: off by O(1) at -g = 3
    assert one_step[0.1, 3.0]["gated delta"] > 10 * one_step[0.1, 0.1]["gated delta"]
    assert one_step[0.1, 3.0]["euler"] > 1  # Euler's sub-step decays by 1 + g: unstable past -g = 2
    assert sequence[0.5, 3.0]["gated delta"] > 0.5


def test_exactness_cli_refuses_a_negative_decay(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["exactness", "--decay", "0.1", "-0.5"])
    assert exit_info.value.code == 2
    assert "-g is the decay per token and must be >= 0 (got -0.5)" in capsys.readouterr().err


def test_exactness_cli_refuses_lengths_out_of_order_before_any_work(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["exactness", "--lengths", "30", "1", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == "efla exactness: error: --lengths must be positive and strictly ascending (got [30, 1])"
    assert not (tmp_path / "out").exists()
