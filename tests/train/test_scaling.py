"""benchmarks/scaling.py on CPU (gloo): 1 and 2 processes, and the accumulation run with the same global batch."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")


def test_scaling_table_and_same_global_batch(corpus, tokenizer_dir, load_script, tmp_path):
    scaling = load_script("benchmarks/scaling.py")
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


def test_baseline_must_be_one_gpu(load_script):
    with pytest.raises(ValueError, match="--gpus must start with 1"):
        load_script("benchmarks/scaling.py").parse_args(["--tokenizer", "t", "--data", "d", "--gpus", "2", "4"])
