"""TrainConfig from files and flags: flags win over the file, the file over the defaults; bad settings are named."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from efla.cli import main
from efla.train.config import TrainConfig, add_config_arguments, config_from_args


def _parse(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_flags_override_the_file_which_overrides_defaults(tmp_path):
    settings = {"tokenizer": "tok", "data": ["a.txt", "b.jsonl"], "seq_len": 512, "lr": 3e-3, "max_tokens": 10**9,
                "model_overrides": {"attn_mode": "delta"}, "compile": True}
    (tmp_path / "run.json").write_text(json.dumps(settings))
    config = _parse(["--config", str(tmp_path / "run.json"), "--seq-len", "1024", "--no-compile",
                     "--model-overrides", '{"num_hidden_layers": 4}', "--strategy", "fsdp", "--resume"])
    assert config.seq_len == 1024 and config.lr == 3e-3 and config.data == ["a.txt", "b.jsonl"]
    assert config.compile is False and config.strategy == "fsdp" and config.resume == "latest"
    assert config.model_overrides == {"num_hidden_layers": 4}
    assert config.micro_batch_size == TrainConfig.micro_batch_size  # untouched default
    # the token budget sets the steps: 1e9 tokens / (1024 tokens * 8 rows * 2 ranks)
    assert config.total_steps(world_size=2) == 61036


def test_yaml_file(tmp_path):
    pytest.importorskip("yaml")
    (tmp_path / "run.yaml").write_text("tokenizer: tok\ndata: [corpus/]\nmax_steps: 100\nwarmup_steps: 10\n")
    config = _parse(["--config", str(tmp_path / "run.yaml")])
    assert (config.max_steps, config.warmup_steps, config.data) == (100, 10, ["corpus/"])
    (tmp_path / "one.yaml").write_text("tokenizer: tok\ndata: corpus/\nmax_steps: 100\n")  # one path, no list
    assert _parse(["--config", str(tmp_path / "one.yaml")]).data == ["corpus/"]


@pytest.mark.parametrize(("settings", "message"), [
    ({"data": ["x"], "max_steps": 1}, "tokenizer is required"),
    ({"tokenizer": "t", "data": ["x"]}, "exactly one of max_steps and max_tokens"),
    ({"tokenizer": "t", "max_steps": 1}, "exactly one of data .* and dataset"),
    ({"tokenizer": "t", "data": ["x"], "max_steps": 1, "strategy": "zero3"}, "strategy must be 'ddp' or 'fsdp'"),
    ({"tokenizer": "t", "data": ["x"], "max_steps": 1, "seq_len": 0}, r"seq_len must be >= 1 \(got 0\)"),
    ({"tokenizer": "t", "data": ["x"], "max_steps": 1, "bacth_size": 8}, r"unknown keys \['bacth_size'\]"),
])
def test_bad_settings_exit_with_a_message(settings, message, tmp_path, capsys):
    (tmp_path / "run.json").write_text(json.dumps(settings))
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--config", str(tmp_path / "run.json")])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert re.match(f"efla train: error: .*{message}", line), line
