"""scripts/compare_lm.py end to end at toy size: both modes trained, evaluated and reported."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")


def test_compare_lm_reports_both_modes(corpus, tokenizer_dir, load_script, tmp_path):
    lines = (corpus / "docstrings.jsonl").read_text().splitlines()
    data = tmp_path / "corpus"
    data.mkdir()
    for name, part in (("train", lines[:-8]), ("validation", lines[-8:-4]), ("test", lines[-4:])):
        (data / f"{name}.jsonl").write_text("\n".join(part) + "\n")
    out = tmp_path / "compare"
    compare_lm = load_script("scripts/compare_lm.py")
    compare_lm.main(["--corpus", str(data), "--tokenizer", str(tokenizer_dir), "--out", str(out), "--gpus", "cpu",
                     "--lrs", "3e-3", "--hidden-size", "32", "--layers", "1", "--heads", "1", "--seq-len", "32",
                     "--batch", "4", "--max-tokens", "512", "--warmup-steps", "1"])
    results = json.loads((out / "results.json").read_text())
    assert {r["mode"] for r in results["runs"]} == {"efla", "delta"}
    for run in results["runs"]:
        assert run["curve"], run["mode"]
        for split in ("validation", "test"):
            assert 1.0 < run[split]["perplexity"] < 1e4, (run["mode"], split, run[split])
    assert set(results["best"]) == {"efla", "delta"}
    table = (out / "table.md").read_text()
    assert "| efla | 0.003 (best) |" in table and "| delta | 0.003 (best) |" in table
    assert (out / "loss_curves.png").stat().st_size > 10_000
