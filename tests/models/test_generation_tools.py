"""benchmarks/generation.py on the CPU (``efla generate`` is tested in tests/commands/test_generate_cli.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")


def test_generation_benchmark_smoke_run(tmp_path, monkeypatch):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "generation.py"
    monkeypatch.syspath_prepend(str(path.parent))  # its sibling results_io.py, as when run as a script
    spec = importlib.util.spec_from_file_location("generation_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    out = tmp_path / "rows.jsonl"
    rows = benchmark.main(["--preset", "tiny", "--device", "cpu", "--batch-sizes", "2", "1",
                           "--prompt-lens", "8", "--new-tokens", "2", "--repeats", "1", "--out", str(out)])
    expected = ["efla plain", "efla eager", "efla graph", "llama sdpa"]  # fla DeltaNet needs CUDA
    # shapes outer, in the order given, models inner: a run cut short keeps side-by-side rows
    assert [(r["batch"], r["model"]) for r in rows] == [(b, m) for b in (2, 1) for m in expected]
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    llama, efla = (next(r["params"] for r in rows if r["model"] == name) for name in ("llama sdpa", "efla eager"))
    assert abs(llama - efla) / efla < 0.05  # same-size baseline
    for row in rows:  # the bar for a whole call: its prefill plus 1.5 ms per new token
        assert row["call_ms"] > 0 and row["prefill_ms"] > 0 and row["first_call_ms"] > 0
        assert row["bar_ms"] == pytest.approx(row["prefill_ms"] + 2 * 1.5)
