"""Defaults a user gets without flags (issues 13 and 16): the tiny preset trains with its own context length, blocks
are compiled on CUDA only unless asked, the activation checkpointing policy is applied to the model, flags are never
abbreviated."""

from __future__ import annotations

import json

import pytest
import torch

from efla.cli import main
from efla.layers import EFLAttention
from efla.train import TrainConfig, train
from efla.train.checkpointing import check_activation_checkpointing
from efla.train.loop import _Run


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


def test_activation_checkpointing_reaches_the_model(run_args, tmp_path, monkeypatch):
    """The trainer applies the policy to the model it built (selective: the EFLA layers recompute their element-wise
    work; full: transformers' checkpointing of every block); the model's config, and so its checkpoints, never hold
    it."""
    with pytest.raises(ValueError, match="activation_checkpointing must be one of"):
        TrainConfig(**run_args, activation_checkpointing="some")
    models = {}
    monkeypatch.setattr(_Run, "run", lambda self: models.setdefault(self.config.activation_checkpointing,
                                                                     self.plain_model))
    for mode in ("none", "selective", "full"):
        train(TrainConfig(**run_args, activation_checkpointing=mode, out_dir=str(tmp_path / mode)))
    for mode, model in models.items():
        layers = [m for m in model.modules() if isinstance(m, EFLAttention)]
        assert layers and all(layer.recompute == (mode == "selective") for layer in layers), mode
        assert model.is_activation_checkpointing == (mode == "full"), mode
        assert "activation_checkpointing" not in model.config.to_dict()
    assert sorted(models) == ["full", "none", "selective"]


def test_selective_checkpointing_needs_an_efla_model():
    from transformers import LlamaConfig

    check_activation_checkpointing(LlamaConfig(), "full")
    with pytest.raises(ValueError, match="'selective' needs an EFLA model; LlamaConfig supports none or full"):
        check_activation_checkpointing(LlamaConfig(), "selective")


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
