"""MQAR: the generated task, the scoring of answers only, and the command's safety rules, on tiny settings."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from efla.cli import main
from efla.experiments.mqar.data import IGNORE, RecallTask, recall_batch
from efla.experiments.mqar.train import SweepConfig, recall_accuracy

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")


def test_every_key_is_queried_once_and_labelled_with_its_value():
    task = RecallTask(seq_len=40, num_pairs=6, vocab_size=32)
    inputs, labels = recall_batch(task, 50, torch.Generator().manual_seed(7))
    assert inputs.shape == labels.shape == (50, 40) and inputs.dtype == labels.dtype == torch.int64
    for x, y in zip(inputs.tolist(), labels.tolist(), strict=True):
        keys, values = x[0:12:2], x[1:12:2]
        assert len(set(keys)) == 6 and all(1 <= k < 16 for k in keys) and all(16 <= v < 32 for v in values)
        answers = {i: label for i, label in enumerate(y) if label != IGNORE}
        assert all(i >= 12 and (i - 12) % 2 == 0 for i in answers)  # queries only, in even slots
        assert sorted(x[i] for i in answers) == sorted(keys)  # each key queried exactly once
        assert all(answers[i] == values[keys.index(x[i])] for i in answers)
        assert all(x[i] == 0 for i in range(12, 40) if i not in answers)  # the filler
    again, _ = recall_batch(task, 50, torch.Generator().manual_seed(7))
    assert torch.equal(inputs, again)
    assert not torch.equal(inputs, recall_batch(task, 50, torch.Generator().manual_seed(8))[0])


def test_settings_without_room_are_refused():
    with pytest.raises(ValueError, match="num_pairs must be in"):
        RecallTask(seq_len=30, num_pairs=8, vocab_size=64)
    with pytest.raises(ValueError, match="fewer than 8 distinct keys"):
        RecallTask(seq_len=64, num_pairs=8, vocab_size=16)


class _Oracle(torch.nn.Module):
    """Answers every query right by looking the key up in the context; puts junk everywhere else."""

    def __init__(self, task: RecallTask, wrong: bool = False) -> None:
        super().__init__()
        self.task, self.wrong = task, wrong

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, self.task.vocab_size)
        logits[..., 0] = 1.0  # junk: the filler token, never an answer
        context = 2 * self.task.num_pairs
        for b, row in enumerate(input_ids.tolist()):
            pairs = dict(zip(row[0:context:2], row[1:context:2], strict=True))
            for t in range(context, len(row)):
                if row[t] in pairs:
                    answer = pairs[row[t]] if not self.wrong else self.task.vocab_size - 1 - pairs[row[t]] % 2
                    logits[b, t, answer] = 2.0
        return SimpleNamespace(logits=logits)


def test_only_answer_positions_are_scored():
    task = RecallTask(seq_len=32, num_pairs=4, vocab_size=64)
    config = SweepConfig(eval_examples=20)
    assert recall_accuracy(_Oracle(task), task, config, batch_size=8) == 100.0
    assert recall_accuracy(_Oracle(task, wrong=True), task, config, batch_size=8) < 60.0


TINY = ["--seq-lens", "16", "--num-pairs", "2", "--steps", "2", "--eval-examples", "4", "--d-model", "16",
        "--threads", "1", "--device", "cpu", "--quiet"]  # fmt: skip


def test_sweep_writes_results_keeps_them_and_records_divergence(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "run"
    try:
        with pytest.raises(SystemExit) as stop:
            main(["mqar", *TINY, "--lrs", "1e-3", "inf", "--out", str(out)])
        assert stop.value.code == 1  # work that did not finish
        assert capsys.readouterr().err.startswith("efla mqar: error: 2 run(s) diverged")
        results = json.loads((out / "results.json").read_text())
        assert results["status"] == "incomplete" and len(results["runs"]) == 4
        finished = [r for r in results["runs"] if r["status"] == "finished"]
        diverged = [r for r in results["runs"] if r["status"] == "diverged"]
        assert {r["mode"] for r in finished} == {r["mode"] for r in diverged} == {"efla", "delta"}
        assert all(r["lr"] == 1e-3 and 0 <= r["accuracy"] <= 100 and len(r["loss_curve"]) == 2 for r in finished)
        assert all(r["lr"] == "inf" and r["step"] >= 1 for r in diverged)
        table = (out / "table.md").read_text()
        assert "| 16 | 2 |" in table and "lr inf seed 0 diverged at step" in table
        assert (out / "recall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        before = (out / "results.json").read_bytes()
        with pytest.raises(SystemExit) as stop:
            main(["mqar", *TINY, "--out", str(out)])
        assert stop.value.code == 2 and "pass --overwrite" in capsys.readouterr().err
        assert (out / "results.json").read_bytes() == before
        main(["mqar", *TINY, "--modes", "efla", "--out", str(out), "--overwrite"])
        assert json.loads((out / "results.json").read_text())["status"] == "complete"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seq-len", "64"], "unrecognized arguments: --seq-len"),
        (["--device", "foo"], "argument --device: device must be auto, cpu, cuda or cuda:N"),
        (["--seq-lens", "16", "--num-pairs", "8"], "no setting has 4 * pairs <= sequence length"),
        (["--num-pairs", "40", "--seq-lens", "256", "--vocab-size", "64"], "leaves fewer than 40 distinct keys"),
    ],
)
def test_bad_arguments_are_one_line_usage_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        main(["mqar", *argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and "Traceback" not in err


def test_gated_modes_train_with_the_decay_gate_and_equal_sizes(tmp_path):
    """--modes takes the gated variants: each model has the decay gate, the two gated ones are the same size, and the
    table names them."""
    from efla.experiments.mqar.train import build_model

    task = RecallTask(16, 2, 64)
    config = SweepConfig(d_model=16)
    models = {mode: build_model(mode, task, config) for mode in ("efla", "gated-efla", "gated-delta")}
    assert not models["efla"].config.use_decay_gate
    assert models["gated-efla"].config.use_decay_gate and models["gated-efla"].config.attn_mode == "efla"
    assert models["gated-delta"].config.use_decay_gate and models["gated-delta"].config.attn_mode == "delta"
    sizes = {mode: sum(p.numel() for p in model.parameters()) for mode, model in models.items()}
    assert sizes["gated-efla"] == sizes["gated-delta"] > sizes["efla"]
    with pytest.raises(ValueError, match="model variant must be one of"):
        build_model("gated", task, config)
    threads = torch.get_num_threads()
    try:
        main(["mqar", *TINY, "--modes", "gated-efla", "gated-delta", "--lrs", "1e-3", "--out", str(tmp_path / "g")])
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "g" / "results.json").read_text())
    assert {r["mode"] for r in results["runs"]} == {"gated-efla", "gated-delta"}
    assert all(r["status"] == "finished" for r in results["runs"])
    table = (tmp_path / "g" / "table.md").read_text()
    assert "gated EFLA" in table and "Gated DeltaNet" in table


def test_merge_joins_sweeps_run_apart_and_refuses_mismatched_or_overlapping_ones(tmp_path, capsys):
    """--merge: sweeps of one mode each become one table with both modes and every run; sweeps of other training
    settings, or with a run in common, are refused with one line; a merge never overwrites an earlier one."""
    threads = torch.get_num_threads()
    try:
        main(["mqar", *TINY, "--modes", "efla", "--out", str(tmp_path / "a")])
        main(["mqar", *TINY, "--modes", "delta", "--lrs", "1e-3", "--out", str(tmp_path / "b")])
        main(["mqar", *TINY, "--modes", "delta", "--steps", "3", "--out", str(tmp_path / "c")])
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    parts = [json.loads((tmp_path / name / "results.json").read_text()) for name in "ab"]
    merged_dir = tmp_path / "merged"
    main(["mqar", "--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(merged_dir)])
    merged = json.loads((merged_dir / "results.json").read_text())
    assert merged["status"] == "complete"
    assert merged["config"]["modes"] == ["efla", "delta"] and merged["config"]["lrs"] == [1e-3, 3e-3, 1e-2]
    assert merged["runs"] == parts[0]["runs"] + parts[1]["runs"]
    assert len(merged["config"]["merged_from"]) == 2 and "timing" not in merged["config"]
    assert "| 16 | 2 |" in (merged_dir / "table.md").read_text() and "DeltaNet" in capsys.readouterr().out

    for argv, message in [
        ([str(tmp_path / "a"), str(tmp_path / "c")], "sweep 2 differs from the first in steps"),
        ([str(tmp_path / "b"), str(tmp_path / "b")], "two sweeps both ran delta T=16 pairs=2 lr 0.001 seed 0"),
        ([str(tmp_path / "a"), str(tmp_path / "missing")], f"--merge {tmp_path / 'missing'}: cannot read"),
        ([str(tmp_path / "a"), "--steps", "3"], "--merge trains nothing; drop --steps"),
        ([str(tmp_path / "a"), str(tmp_path / "refused"), "--overwrite"], "is one of the --merge folders"),
    ]:
        with pytest.raises(SystemExit) as stop:
            main(["mqar", "--merge", *argv, "--out", str(tmp_path / "refused")])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and "Traceback" not in err
    # a merged sweep merges again with another one, keeping every process's timing
    threads = torch.get_num_threads()
    try:
        main(["mqar", *TINY, "--modes", "delta", "--lrs", "1e-1", "--out", str(tmp_path / "d")])
    finally:
        torch.set_num_threads(threads)
    main(["mqar", "--merge", str(merged_dir), str(tmp_path / "d"), "--out", str(tmp_path / "again")])
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert len(again["runs"]) == len(merged["runs"]) + 1 and len(again["config"]["merged_from"]) == 3
    capsys.readouterr()
    before = (merged_dir / "results.json").read_bytes()
    with pytest.raises(SystemExit) as stop:
        main(["mqar", "--merge", str(tmp_path / "a"), "--out", str(merged_dir)])
    assert stop.value.code == 2 and "pass --overwrite" in capsys.readouterr().err
    assert (merged_dir / "results.json").read_bytes() == before
