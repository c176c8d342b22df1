"""benchmarks/scaling.py on CPU (gloo): 1 and 2 processes, and the accumulation run with the same global batch."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "scaling.py"


def test_scaling_table_and_same_global_batch(corpus, tokenizer_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("scaling", SCRIPT)
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    out = tmp_path / "scaling"
    scaling.main(["--tokenizer", str(tokenizer_dir), "--data", str(corpus), "--preset", "tiny", "--strategy", "ddp",
                  "--gpus", "1", "2", "--micro-batch-size", "2", "--seq-len", "32", "--steps", "3", "--skip", "0",
                  "--same-global-batch", "--out", str(out), "--", "--lr", "3e-3", "--warmup-steps", "1"])
    report = json.loads((out / "scaling.json").read_text())
    one, two = report["runs"]
    assert (one["gpus"], two["gpus"]) == (1, 2)
    assert one["efficiency"] == pytest.approx(1.0)
    assert two["tokens_per_s"] > 0
    assert two["efficiency"] == pytest.approx(two["tokens_per_s"] / (2 * one["tokens_per_s"]))
    assert len(two["losses"]) == 3
    # 2 ranks x 2 rows and 1 process x 2 accumulation steps x 2 rows train on the same rows: float32 losses agree
    assert report["same_global_batch"]["max_abs_diff"] < 1e-4
    assert "| 2 |" in (out / "table.md").read_text()
    assert (out / "loss_curves.png").stat().st_size > 10_000


def test_baseline_must_be_one_gpu():
    spec = importlib.util.spec_from_file_location("scaling", SCRIPT)
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    with pytest.raises(ValueError, match="--gpus must start with 1"):
        scaling.parse_args(["--tokenizer", "t", "--data", "d", "--gpus", "2", "4"])
