"""sMNIST study: the model against the operator's reference, corruptions, report, and an end-to-end smoke run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from efla import efla_attention
from efla.cli import main
from efla.experiments.smnist.corruptions import CORRUPTIONS, gaussian_noise, pixel_dropout, scale_intensity
from efla.experiments.smnist.model import ClassifierConfig, SequentialClassifier
from efla.experiments.smnist.report import area_under_curve

pytest.importorskip("mlxtend")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")


@pytest.mark.parametrize("method", ["efla", "delta"])
def test_classifier_reads_the_last_output_of_the_recurrence(method):
    """Logits from the final state equal LayerNorm + head of o[:, -1] from the step-by-step reference."""
    torch.manual_seed(0)
    config = ClassifierConfig(method, d_model=16, seq_len=40, chunk_size=16)
    model = SequentialClassifier(config).double()
    pixels = torch.rand(3, 40, dtype=torch.float64)
    x = F.gelu(model.embed(pixels.unsqueeze(-1)) + model.position)
    q = F.normalize(model.q_proj(x), dim=-1).unsqueeze(2)
    k = model.k_proj(x).unsqueeze(2)
    k = F.normalize(k, dim=-1) if method == "delta" else k
    beta = torch.sigmoid(model.beta_proj(x))
    o, _ = efla_attention(q, k, model.v_proj(x).unsqueeze(2), beta, mode=method, backend="recurrent")
    expected = model.head(model.norm(o[:, -1, 0]))
    torch.testing.assert_close(model(pixels), expected, rtol=1e-10, atol=1e-10)
    assert model.beta_proj.bias.item() == -2.0


def test_classifier_rejects_bad_input():
    with pytest.raises(ValueError, match="method must be one of"):
        SequentialClassifier(ClassifierConfig("euler"))
    with pytest.raises(ValueError, match=r"pixels must be \[B, 784\]"):
        SequentialClassifier(ClassifierConfig())(torch.rand(2, 28, 28))


def test_corruptions():
    pixels = torch.rand(64, 784)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(scale_intensity(pixels, 3.0, generator), 3 * pixels)
    assert torch.equal(pixel_dropout(pixels, 0.0, generator), pixels)
    assert not pixel_dropout(pixels, 1.0, generator).any()
    kept = (pixel_dropout(pixels, 0.3, generator) != 0).float().mean().item()
    assert abs(kept - 0.7) < 0.01
    noise = gaussian_noise(pixels, 0.5, generator) - pixels
    assert abs(noise.std().item() - 0.5) < 0.01 and abs(noise.mean().item()) < 0.01
    again = gaussian_noise(pixels, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(gaussian_noise(pixels, 0.5, torch.Generator().manual_seed(0)), again)
    grids = {c.name: c.levels for c in CORRUPTIONS}
    assert grids["ood_scale"] == tuple(float(s) for s in range(1, 11))
    assert grids["gaussian_noise"] == grids["pixel_dropout"] == tuple(i / 10 for i in range(11))


def test_area_under_curve_is_the_mean_accuracy_over_the_grid():
    flat = np.full((11, 2), 40.0)
    np.testing.assert_allclose(area_under_curve([i / 10 for i in range(11)], flat), [40.0, 40.0])
    falling = np.array([[100.0], [0.0]])
    np.testing.assert_allclose(area_under_curve([1.0, 10.0], falling), [50.0])


def test_bad_arguments_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        main(["smnist", "--steps", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--batch-size 128 exceeds the 50 training digits"):
        main(["smnist", "--train-size", "50", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="nowhere is not a directory"):
        main(["smnist", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)])


def test_smoke_run_end_to_end(tmp_path, capsys):
    """A few hundred real digits through training, every grid point, results.json, plots and the table."""
    n_test, steps = 30, 2
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:  # one thread: shared CI cores make two threads many times slower, not faster
        main(["smnist", "--train-size", "256", "--test-size", str(n_test), "--steps", str(steps), "--seeds", "2",
              "--batch-size", "32", "--threads", "1", "--device", "cpu", "--out", str(out), "--quiet"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "| clean |" in printed and "EFLA" in printed and "DeltaNet" in printed

    results = json.loads((out / "results.json").read_text())
    assert results["config"]["n_train"] == 256 and results["config"]["n_test"] == n_test
    assert set(results["methods"]) == {"efla", "delta"}
    test_labels = np.bincount(_test_labels(n_test), minlength=10)
    for method, lr in (("efla", 3e-3), ("delta", 1e-3)):
        entry = results["methods"][method]
        assert entry["lr"] == lr and entry["seeds"] == [0, 1]
        assert len(entry["loss_curve"]) == steps and all(np.isfinite(entry["loss_curve"]))
        for corruption in CORRUPTIONS:
            assert list(entry[corruption.name]) == [str(level) for level in corruption.levels]
            for values in entry[corruption.name].values():
                assert len(values) == 2
                # accuracies are whole numbers of correct digits out of n_test
                assert all(0 <= v <= 100 and abs(v * n_test / 100 - round(v * n_test / 100)) < 1e-9 for v in values)
        clean = entry["clean_accuracy"]
        assert entry["ood_scale"]["1.0"] == entry["gaussian_noise"]["0.0"] == entry["pixel_dropout"]["0.0"] == clean
        # p = 1 blanks every image: the model answers one class for all, so it scores that class's share
        shares = {100 * count / n_test for count in test_labels}
        assert all(min(abs(v - s) for s in shares) < 1e-9 for v in entry["pixel_dropout"]["1.0"])
    for name in ("loss_curves.png", "robustness.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "table.md").read_text().startswith("Accuracy in %")


def _test_labels(n: int) -> np.ndarray:
    from efla.data import load_mnist

    return load_mnist().test_labels[:n]
