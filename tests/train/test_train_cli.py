"""``efla train`` as a new user meets it: one-line errors for a tokenizer that does not fit the model and for
--model-overrides that is not JSON, notes for a warm-up longer than the run and a vocab_size taken from the
tokenizer, and a run that fails before its first step leaves nothing that blocks its rerun."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from command_line import run_efla

from efla.train.loop import _Run
from efla.train.run_dir import RUN_OUTPUTS
from efla.train.tokenizer import load_tokenizer


def _flags(settings: dict) -> list[str]:
    """Command-line flags for TrainConfig settings."""
    flags = []
    for name, value in settings.items():
        flags.append("--" + name.replace("_", "-"))
        flags.extend(map(str, value) if isinstance(value, list) else [str(value)])
    return flags



def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("efla train: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused_before_any_work(run_args, tokenizer_dir, tmp_path,
                                                                                   capsys):
    out = tmp_path / "run"
    tokens = len(load_tokenizer(tokenizer_dir))
    code, _, err = run_efla(["train", *_flags({**run_args, "out_dir": out}), "--model-overrides",
                          '{"vocab_size": 256}'], capsys)
    assert code == 2
    line = _error_line(err)
    assert f"the tokenizer has {tokens} tokens but the model's vocab_size is 256" in line
    assert f"raise vocab_size in --model-overrides to at least {tokens}" in line
    assert not out.exists()


def test_model_overrides_that_are_not_json_show_an_example(run_args, tmp_path, capsys):
    code, _, err = run_efla(["train", *_flags({**run_args, "out_dir": tmp_path / "run"}), "--model-overrides",
                          "vocab_size=256"], capsys)
    assert code == 2
    assert ("argument --model-overrides: takes a JSON object, e.g. --model-overrides '{\"vocab_size\": 256}' "
            "(got 'vocab_size=256')") in err.splitlines()[-1]


def test_a_short_run_says_its_warmup_outlasts_it_and_where_its_vocab_size_comes_from(run_args, tokenizer_dir,
                                                                                     tmp_path, capsys):
    code, _, err = run_efla(["train", *_flags({**run_args, "max_steps": 2, "warmup_steps": 100,
                                            "out_dir": tmp_path / "run"})], capsys)
    assert code == 0, err
    tokens = len(load_tokenizer(tokenizer_dir))
    assert ("warning: warmup_steps 100 >= the run's 2 steps, so the learning rate never reaches lr 0.003; lower "
            "--warmup-steps") in err.splitlines()
    assert any(line.startswith(f"note: the model's vocab_size is {tokens}, the tokenizer's size (the tiny preset's "
                               "is 256)") for line in err.splitlines()), err


def test_a_run_that_fails_at_step_1_leaves_nothing_that_blocks_its_rerun(run_args, tmp_path, monkeypatch, capsys):
    """A loss that is NaN at the first step (exit 1): the attempt's metrics.jsonl, train_config.json and folders are
    removed, what was in out_dir before is kept, and the same command then runs."""
    real_loss = _Run._loss_sum

    def nan_loss(self, batch):
        return real_loss(self, batch) * math.nan

    for out in (tmp_path / "new", tmp_path / "existing"):
        if out.name == "existing":
            out.mkdir()
            (out / "notes.txt").write_text("the user's own file\n")
        argv = ["train", *_flags({**run_args, "max_steps": 2, "out_dir": out})]
        monkeypatch.setattr(_Run, "_loss_sum", nan_loss)
        code, _, err = run_efla(argv, capsys)
        assert code == 1 and "training diverged at step 1" in _error_line(err)
        if out.name == "new":
            assert not out.exists()
        else:
            assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
        monkeypatch.setattr(_Run, "_loss_sum", real_loss)
        code, _, err = run_efla(argv, capsys)
        assert code == 0, err
        assert all((out / name).exists() for name in ("model", "metrics.jsonl", "train_config.json"))


def test_a_run_that_fails_after_its_first_step_keeps_its_files(run_args, tmp_path, monkeypatch, capsys):
    real_loss = _Run._loss_sum

    def nan_loss_at_step_2(self, batch):
        loss = real_loss(self, batch)
        return loss * math.nan if self.step == 1 else loss

    monkeypatch.setattr(_Run, "_loss_sum", nan_loss_at_step_2)
    out = tmp_path / "run"
    code, _, err = run_efla(["train", *_flags({**run_args, "max_steps": 3, "save_every": 1, "out_dir": out})], capsys)
    assert code == 1 and "training diverged at step 2" in _error_line(err)
    assert {name for name in RUN_OUTPUTS if (out / name).exists()} >= {"checkpoints", "metrics.jsonl",
                                                                       "train_config.json"}
    assert (out / "checkpoints" / "latest").read_text() == "step_00000001"
    assert torch.load(out / "checkpoints" / "step_00000001" / "trainer_state.pt", weights_only=True)["step"] == 1
    assert Path(out / "metrics.jsonl").read_text().count("\n") == 1
