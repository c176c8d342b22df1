"""Defaults a user gets without flags (issues 13 and 16): the tiny preset trains with its own context length, blocks
are compiled on CUDA only unless asked, activation checkpointing reaches the model, flags are never abbreviated."""

from __future__ import annotations

import json

import pytest
import torch

from efla.cli import main
from efla.models import EFLAConfig
from efla.train import TrainConfig, train
from efla.train.loop import _Run, model_config
from efla.train.tokenizer import load_tokenizer


def test_tiny_trains_with_default_flags(corpus, tokenizer_dir, run_args, tmp_path):
    """Only what a run needs (tokenizer, data, a budget): seq_len follows the tiny preset's 512 tokens."""
    config = TrainConfig(model="tiny", tokenizer=str(tokenizer_dir), data=[str(corpus)], max_steps=1,
                         micro_batch_size=2, cache_dir=run_args["cache_dir"], out_dir=str(tmp_path))
    assert config.seq_len is None
    train(config)
    assert json.loads((tmp_path / "train_config.json").read_text())["seq_len"] == 512
    assert json.loads((tmp_path / "model" / "train_config.json").read_text())["seq_len"] == 512
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["tokens"] == 2 * 512


@pytest.mark.parametrize(("flag", "compiled"), [(None, torch.cuda.is_available()), (True, True), (False, False)])
def test_blocks_compile_by_default_on_cuda_only(flag, compiled, run_args, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("efla.train.loop.parallelize",
                        lambda model, strategy, world, compile_blocks: seen.append(compile_blocks) or model)
    monkeypatch.setattr(_Run, "run", lambda self: None)
    train(TrainConfig(**run_args, compile=flag, out_dir=str(tmp_path)))
    assert seen == [compiled]


def test_activation_checkpointing_reaches_the_model(run_args, tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    with pytest.raises(ValueError, match="activation_checkpointing must be one of"):
        TrainConfig(**run_args, activation_checkpointing="some")
    knows_field = "activation_checkpointing" in EFLAConfig.__init__.__code__.co_varnames
    for mode in ("none", "selective", "full"):
        config = TrainConfig(**run_args, activation_checkpointing=mode)
        if knows_field:
            assert model_config(config, tokenizer).activation_checkpointing == mode
        elif mode == "selective":
            with pytest.raises(ValueError, match="'selective' needs a model that supports it"):
                model_config(config, tokenizer)


def test_full_activation_checkpointing_recomputes_blocks(run_args, tmp_path, monkeypatch):
    models = []
    monkeypatch.setattr(_Run, "run", lambda self: models.append(self.plain_model))
    train(TrainConfig(**run_args, activation_checkpointing="full", out_dir=str(tmp_path)))
    (model,) = models
    assert getattr(model.config, "activation_checkpointing", None) == "full" or model.is_activation_checkpointing


@pytest.mark.parametrize("argv", [
    ["train", "--max-step", "3"],
    ["train", "--micro-batch", "4"],
    ["tokenizer", "train", "--data", "x", "--out", "y", "--vocab", "300"],
    ["eval", "ppl", "--model", "m", "--dataset", "d", "--file", "x.jsonl"],
])
def test_abbreviated_flags_are_rejected(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
