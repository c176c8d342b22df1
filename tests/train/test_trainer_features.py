"""Trainer features flame/torchtitan users expect (issue 16): validation loss on held-out rows, transformers' learning
rate schedules (cosine, WSD, linear) that resume exactly, a TensorBoard notice, Weights & Biases offline."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from efla.train import TrainConfig, train
from efla.train.data import TokenCorpus
from efla.train.packing import PackedRows, StepSampler, make_batch


def _metrics(out_dir: Path) -> dict[int, dict]:
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record for record in map(json.loads, lines)}


def test_validation_loss_is_the_loss_on_held_out_rows(run_args, tmp_path, capsys):
    train(TrainConfig(**{**run_args, "val_every": 3, "val_rows": 4, "log_every": 2}, out_dir=str(tmp_path)))
    records = _metrics(tmp_path)
    assert sorted(records) == [2, 3, 4, 6] and [s for s in records if "val_loss" in records[s]] == [3, 6]
    # the final validation loss, recomputed from the saved model on the corpus's last 4 rows
    (cache,) = Path(run_args["cache_dir"]).iterdir()
    rows = PackedRows(TokenCorpus.open(cache), seq_len=run_args["seq_len"])
    held_out = list(range(len(rows) - 4, len(rows)))
    batch = make_batch(rows, held_out, flatten=True)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], cu_seqlens=batch["cu_seqlens"], use_cache=False).logits
    expected = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="sum").item()
    assert records[6]["val_loss"] == pytest.approx(expected / rows.num_targets(held_out, flatten=True), rel=1e-5)
    # the held-out rows are never trained on
    sampler = StepSampler(len(rows) - 4, run_args["micro_batch_size"], run_args["seed"])
    trained = {int(i) for step in range(6) for i in sampler.step_rows(step)}
    assert trained.isdisjoint(held_out)
    assert "val_loss=" in capsys.readouterr().err  # shown in the progress bar


@pytest.mark.parametrize("schedule", ["wsd", "linear"])
def test_schedules_follow_transformers_and_resume_exactly(schedule, run_args, tmp_path):
    settings = {**run_args, "schedule": schedule, "decay_ratio": 0.5, "min_lr_ratio": 0.2, "val_every": 3,
                "val_rows": 2}
    train(TrainConfig(**settings, out_dir=str(tmp_path / "full")))
    full = _metrics(tmp_path / "full")
    lr, warmup = run_args["lr"], run_args["warmup_steps"]
    expected = {  # the lr of steps 1..6: warmup over 0-based steps 0, 1 (wsd's from min_lr_ratio), then the schedule
        "wsd": [lr * 0.2, lr * 0.6, lr, lr, lr * (0.2 + 0.8 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 3)).item())),
                lr * (0.2 + 0.8 * 0.5 * (1 + torch.cos(torch.tensor(2 * torch.pi / 3)).item()))],
        "linear": [0, lr / 2, lr, lr * 3 / 4, lr / 2, lr / 4],
    }[schedule]
    assert warmup == 2
    assert [full[s]["lr"] for s in range(1, 7)] == pytest.approx(expected, rel=1e-6, abs=1e-12)
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000003", out / "checkpoints" / "step_00000003")
    train(TrainConfig(**settings, out_dir=str(out), resume=str(out / "checkpoints" / "step_00000003")))
    resumed = _metrics(out)
    for step in (4, 5, 6):
        for key in ("loss", "lr", "grad_norm"):
            assert resumed[step][key] == pytest.approx(full[step][key], abs=1e-6, rel=0), (step, key)
    assert resumed[6]["val_loss"] == pytest.approx(full[6]["val_loss"], abs=1e-6, rel=0)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="checks the notice without it")
def test_a_notice_says_tensorboard_is_missing(run_args, tmp_path, capsys):
    train(TrainConfig(**{**run_args, "max_steps": 1}, out_dir=str(tmp_path)))
    assert "TensorBoard is not installed (pip install tensorboard)" in capsys.readouterr().err


def test_wandb_offline(run_args, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(TrainConfig(**{**run_args, "max_steps": 2, "wandb": True}, out_dir=str(tmp_path)))
    run_id = (tmp_path / "wandb" / "run_id").read_text()
    (run_dir,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")
    assert (run_dir / f"run-{run_id}.wandb").stat().st_size > 0


def test_the_first_step_loss_is_the_plain_cross_entropy(reference_run, run_args, tokenizer_dir):
    """The loss the trainer records (the model's own, issue 13's one place) is the mean next-token cross-entropy of
    the initial weights on step 1's rows, computed here with full logits."""
    from efla.train.loop import model_config
    from efla.train.tokenizer import load_tokenizer

    config = TrainConfig(**run_args, out_dir="unused")
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_config(model_config(config, load_tokenizer(tokenizer_dir)))
    (cache,) = Path(run_args["cache_dir"]).iterdir()
    rows = PackedRows(TokenCorpus.open(cache), seq_len=run_args["seq_len"])
    step_rows = StepSampler(len(rows), run_args["micro_batch_size"], run_args["seed"]).step_rows(0)
    batch = make_batch(rows, step_rows, flatten=True)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], cu_seqlens=batch["cu_seqlens"], use_cache=False).logits
    expected = F.cross_entropy(logits.flatten(0, 1).double(), batch["targets"].flatten()).item()
    assert _metrics(reference_run)[1]["loss"] == pytest.approx(expected, rel=1e-6)
