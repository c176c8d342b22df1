"""The model configuration of a run: presets or config files, overridden by the tokenizer's vocabulary."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from efla.models import preset_config
from efla.train import TrainConfig
from efla.train.loop import model_config


def test_config_of_a_bf16_checkpoint_still_trains_float32_weights(tmp_path):
    """A config.json saved from a bf16 model says dtype bfloat16: the weights (and AdamW's state) must stay float32,
    bf16 being autocast's business."""
    saved = {**preset_config("tiny").to_dict(), "dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    tokenizer = type("Tokenizer", (), {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2,
                                       "__len__": lambda self: 300})()
    config = TrainConfig(model=str(tmp_path), tokenizer="tok", data=["corpus"], max_steps=1, seq_len=64)
    model = AutoModelForCausalLM.from_config(model_config(config, tokenizer))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.vocab_size == 300
