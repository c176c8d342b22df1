"""benchmarks/report.py and benchmarks/results_io.py (CPU, no GPU, seconds): the documents' tables are up to date
with the result files, the tables are rendered from the right runs, and the documents' links resolve."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
DOCUMENTS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "EXPERIMENTS.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.fixture
def report(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import report

    return report


@pytest.fixture
def results_io(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import results_io

    return results_io


def write_run(directory: Path, name: str, rows: list[dict], **common) -> Path:
    path = directory / name
    path.write_text("".join(json.dumps({"date": name[:10], "device": "NVIDIA H200", **common, **row}) + "\n"
                            for row in rows))
    return path


def kernel_rows(shape: str, fla: float, ours: float) -> list[dict]:
    return [{"benchmark": "kernels", "gated": False, "shape": shape, "impl": "fla DeltaNet", "fwd_ms": fla,
             "fwd_bwd_ms": 3 * fla, "peak_mib": 100},
            {"benchmark": "kernels", "gated": False, "shape": shape, "impl": "ours efla", "fwd_ms": ours,
             "fwd_bwd_ms": 3 * ours, "peak_mib": 90}]


def test_documents_are_up_to_date_with_the_result_files():
    result = subprocess.run([sys.executable, str(BENCHMARKS / "report.py"), "--check"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_check_names_a_stale_table(report, tmp_path, monkeypatch):
    document = tmp_path / "README.md"
    document.write_text("intro\n<!-- table: kernels -->\nold\n<!-- end table -->\nafter\n")
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    write_run(results, "2026-01-01_h200_kernels.jsonl", kernel_rows("8x4096x16x128", 1.0, 0.5))
    monkeypatch.setattr(report, "ROOT", tmp_path)
    assert report.main(["--check"]) == 1
    assert "old" in document.read_text()  # --check changes nothing
    assert report.main([]) == 0
    text = document.read_text()
    assert text.startswith("intro\n<!-- table: kernels -->\n") and text.endswith("<!-- end table -->\nafter\n")
    assert "| 8x4096x16x128 | 1.000 | 0.500 | 0.50 | 3.000 | 1.500 | 0.50 | 0.90 |" in text
    assert report.main(["--check"]) == 0  # idempotent


def test_each_shape_comes_from_the_newest_run_that_timed_it_beside_the_baseline(report, tmp_path):
    write_run(tmp_path, "2026-01-01_h200_kernels.jsonl",
              kernel_rows("8x4096x16x128", 1.0, 0.9) + kernel_rows("1x32768x8x128", 2.0, 1.0), commit="aaa")
    # a newer run: one shape again beside fla, and one shape of ours alone (no baseline row: not used)
    write_run(tmp_path, "2026-01-02_h200_kernels.jsonl",
              kernel_rows("8x4096x16x128", 1.0, 0.8) + kernel_rows("1x32768x8x128", 2.0, 0.1)[1:], commit="bbb")
    lines = report.kernels(report.Results(tmp_path), tmp_path, gated=False)
    rows = [line for line in lines if line.startswith("| 8x") or line.startswith("| 1x")]
    assert rows[0].startswith("| 8x4096x16x128 | 1.000 | 0.800 | 0.80 |") and rows[0].endswith("| 1 |")
    assert rows[1].startswith("| 1x32768x8x128 | 2.000 | 1.000 | 0.50 |") and rows[1].endswith("| 2 |")
    text = "\n".join(lines)
    assert "1. NVIDIA H200, 2026-01-02, tree bbb" in text and "2. NVIDIA H200, 2026-01-01, tree aaa" in text
    assert "(2026-01-02_h200_kernels.jsonl)" in text  # a link to the file, relative to the document


def test_a_ratio_reported_by_the_run_stands_in_for_missing_absolute_numbers(report):
    base = {"fwd_ms": 1.0, "peak_mib": None}
    assert report.ratio({"fwd_ms": 0.5}, base, "fwd_ms") == 0.5
    assert report.ratio({"peak_vs_baseline": 0.93}, base, "peak_mib") == 0.93
    assert report.ratio({"fwd_vs_baseline": 0.84}, base, "fwd_ms") == 0.84
    assert report.ratio(None, base, "fwd_ms") is None


def test_whole_generate_calls_get_their_own_table_beside_the_bar(report, tmp_path):
    common = {"benchmark": "generation", "preset": "340M", "new_tokens": 128, "batch": 1, "prompt": 128}
    write_run(tmp_path, "2026-01-01_h200_generation.jsonl", [
        {**common, "model": "efla plain", "ms_per_token": 1.2, "tokens_per_s": 833, "call_ms": 170.4,
         "bar_ms": 200.0, "first_call_ms": 420.0, "prefill_ms": 8.0},
        {**common, "model": "fla DeltaNet", "ms_per_token": 50.0, "tokens_per_s": 20, "call_ms": 6400.0,
         "bar_ms": 201.0, "first_call_ms": 6500.0, "prefill_ms": 9.0}])
    text = "\n".join(report.generation(report.Results(tmp_path), tmp_path))
    assert "| 1 | 128 | 1.20 (833) | 50.00 (20) |" in text
    assert "| 1 | 128 | 170 / 200 (420) | 6400 / 201 (6500) |" in text
    assert "Whole generate calls of 128 new tokens" in text


def test_runs_sort_by_date_then_run_number(report, tmp_path):
    for name in ("2026-01-02_h200_loss_10.jsonl", "2026-01-02_h200_loss.jsonl", "2026-01-01_h200_loss_3.jsonl",
                 "2026-01-02_h200_loss_2.jsonl"):
        write_run(tmp_path, name, [{"benchmark": "loss", "tokens": 1, "impl": name, "ms": 1.0, "peak_mib": 1}])
    runs = report.Results(tmp_path).runs
    assert [run.path.name for run in runs] == ["2026-01-01_h200_loss_3.jsonl", "2026-01-02_h200_loss.jsonl",
                                               "2026-01-02_h200_loss_2.jsonl", "2026-01-02_h200_loss_10.jsonl"]
    assert report.Results(tmp_path).newest(lambda r: True).path.name == "2026-01-02_h200_loss_10.jsonl"


def test_an_unknown_table_is_an_error_naming_it(report, tmp_path):
    with pytest.raises(SystemExit, match="unknown table 'nope'"):
        report.render("<!-- table: nope -->\n<!-- end table -->\n", report.Results(tmp_path), tmp_path, "X.md")


def test_writer_adds_the_run_fields_and_starts_a_fresh_numbered_file(results_io, tmp_path):
    first = results_io.new_results_path("kernels", "NVIDIA H100 80GB HBM3", "2026-01-01", tmp_path)
    assert first.name == "2026-01-01_h100_kernels.jsonl"
    first.write_text("")
    assert results_io.new_results_path("kernels", "NVIDIA H100 80GB HBM3", "2026-01-01", tmp_path).name == \
        "2026-01-01_h100_kernels_2.jsonl"
    writer = results_io.ResultsWriter("loss", "cpu", tmp_path / "rows.jsonl", hidden=64)
    row = writer.write(tokens=8, ms=1.5)
    assert row["benchmark"] == "loss" and row["device"] == "cpu" and row["hidden"] == 64 and row["tokens"] == 8
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row["date"]) and "torch" in row["versions"]
    assert results_io.read_rows(tmp_path / "rows.jsonl") == [row]


def test_a_malformed_results_line_is_named_by_file_and_line(results_io, tmp_path):
    path = tmp_path / "2026-01-01_cpu_loss.jsonl"
    path.write_text('{"benchmark": "loss"}\n\nnot json\n')
    with pytest.raises(ValueError, match=r"2026-01-01_cpu_loss.jsonl:3: not a JSON object"):
        results_io.read_rows(path)


def test_every_result_file_carries_the_fields_a_table_needs(results_io):
    for path in sorted((BENCHMARKS / "results").glob("*.jsonl")):
        for row in results_io.read_rows(path):
            assert {"benchmark", "date", "device", "versions", "command"} <= row.keys(), path.name
            assert path.name.startswith(row["date"]), path.name
            assert path.stem.split("_", 2)[2].startswith(row["benchmark"]), path.name


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {github_anchor(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve_to_files_and_headings_in_the_repository(document):
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (document.parent / file).resolve() if file else document
        missing_heading = anchor and path.suffix == ".md" and path.exists() and anchor not in anchors(path)
        if not path.exists() or missing_heading:
            broken.append(target)
    assert not broken, broken


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documents_read_as_today_not_as_a_diary(document):
    text = document.read_text()
    assert not re.findall(r"^#+ .*\d{4}-\d{2}-\d{2}", text, flags=re.M), "dated headings"
    assert not re.findall(r"\b(?:this|next|third|fourth|fifth|sixth|seventh) session\b|\bsessions?\b", text)
    assert not re.findall(r"\bPAPER\.md\b|\bKINDS\.md\b|nvidia-h\d00", text)


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def cells(line: str) -> int:
    """Cells of a markdown table row (a | inside a code span does not split)."""
    return len(re.sub(r"`[^`]*`", "", line).strip().strip("|").split("|"))


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_table_row_has_its_header_s_cells(document):
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.S)
    ragged = []
    for block in re.findall(r"(?:^\|.*\|\n)+", text, flags=re.M):
        rows = block.splitlines()
        ragged += [row for row in rows if cells(row) != cells(rows[0])]
    assert not ragged, ragged
