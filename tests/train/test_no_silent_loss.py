"""Issue 15, "no silent loss", for training: no mistake or fault destroys or hides finished work, and every user error
is one line naming what to change (exit code 2), while an unfinished run exits non-zero. CPU, the tiny preset."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from efla.cli import main
from efla.train import TrainConfig, train
from efla.train.config import add_config_arguments, config_from_args
from efla.train.loop import TrainingDiverged, _Run


def _metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _flags(settings: dict) -> list[str]:
    flags = []
    for name, value in settings.items():
        flags.append("--" + name.replace("_", "-"))
        flags.extend(map(str, value) if isinstance(value, list) else [json.dumps(value) if isinstance(value, dict)
                                                                       else str(value)])
    return flags


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of ``efla ARGV`` run in this process (0 when it returns)."""
    try:
        main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def _digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy_run(reference_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    return out


# 1. a second run into a used out_dir


def test_a_new_run_never_replaces_a_finished_one(reference_run, run_args, tmp_path, capsys):
    out = _copy_run(reference_run, tmp_path)
    before = _digests(out)
    code, err = _cli(["train", *_flags({**run_args, "max_steps": 2, "out_dir": out})], capsys)
    assert code == 2
    (line,) = err.splitlines()
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert _digests(out) == before  # nothing deleted, moved or appended
    # a folder holding only other files (a log, the run's own config) is fine
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "log.txt").write_text("started\n")
    assert _cli(["train", *_flags({**run_args, "max_steps": 1, "out_dir": tmp_path / "fresh"})], capsys)[0] == 0
    # --overwrite replaces the run on purpose: the old checkpoints and metrics are gone, the new ones are there
    assert _cli(["train", *_flags({**run_args, "max_steps": 2, "out_dir": out}), "--overwrite"], capsys)[0] == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    assert [record["step"] for record in _metrics(out)] == [1, 2]


# 2. divergence


def test_a_non_finite_loss_stops_the_run_and_keeps_the_good_checkpoints(run_args, tmp_path, monkeypatch, capsys):
    real_loss = _Run._loss_sum

    def loss_that_turns_nan_at_step_5(self, batch):
        loss = real_loss(self, batch)
        return loss * float("nan") if self.step == 4 else loss

    monkeypatch.setattr(_Run, "_loss_sum", loss_that_turns_nan_at_step_5)
    out = tmp_path / "run"
    code, err = _cli(["train", *_flags({**run_args, "save_every": 2, "keep_checkpoints": 1, "out_dir": out})], capsys)
    assert code == 1
    assert "training diverged at step 5: loss nan" in err and "the last good checkpoint, step 4, is kept" in err
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000004"
    weights = load_file(checkpoints / "step_00000004" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "model").exists()  # no final model for a run that did not finish
    assert [record["step"] for record in _metrics(out)] == [1, 2, 3, 4]


def test_a_huge_learning_rate_is_caught(run_args, tmp_path):
    with pytest.raises(TrainingDiverged, match="training diverged at step"):
        train(TrainConfig(**{**run_args, "lr": 1e4, "warmup_steps": 1, "max_steps": 20, "save_every": 100},
                          out_dir=str(tmp_path)))
    assert not (tmp_path / "model").exists()


# 5 and 2: damaged checkpoints


@pytest.mark.parametrize("damage", ["overwrite", "truncate"])
def test_resume_skips_a_damaged_checkpoint(damage, reference_run, run_args, tmp_path, capsys):
    """The newest checkpoint (step 6) damaged after it was written: bytes overwritten in place (same size), or a file
    cut short. --resume verifies the checksums, sets it aside and continues from step 3, exactly as the first run."""
    out = _copy_run(reference_run, tmp_path)
    newest = out / "checkpoints" / "step_00000006"
    if damage == "overwrite":
        with (newest / "model.safetensors").open("r+b") as f:
            f.seek(-64, os.SEEK_END)
            f.write(b"\xff" * 64)  # the tail of the last tensor: NaN bits
    else:
        data = (newest / "optimizer.pt").read_bytes()
        (newest / "optimizer.pt").write_bytes(data[:len(data) // 2])
    train(TrainConfig(**run_args, out_dir=str(out), resume="latest"))
    err = capsys.readouterr().err
    assert "step_00000006 is damaged" in err and "resuming from step_00000003" in err
    assert (out / "checkpoints" / "step_00000006.damaged").is_dir()  # kept for inspection, out of the rotation
    assert (out / "checkpoints" / "latest").read_text() == "step_00000006"
    resumed, reference = _metrics(out), _metrics(reference_run)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for record, expected in zip(resumed, reference, strict=True):
        assert record["loss"] == pytest.approx(expected["loss"], abs=1e-6, rel=0)


def test_resume_from_a_named_damaged_checkpoint_is_refused(reference_run, run_args, tmp_path, capsys):
    out = _copy_run(reference_run, tmp_path)
    named = out / "checkpoints" / "step_00000003"
    (named / "trainer_state.pt").write_bytes(b"not a checkpoint")
    code, err = _cli(["train", *_flags({**run_args, "out_dir": out}), "--resume", str(named)], capsys)
    assert code == 2
    (line,) = err.splitlines()
    assert "step_00000003 is damaged (trainer_state.pt differs from its checksum)" in line


# 6. metrics after a crash; train_config.json after a failed start


def test_resume_cuts_metrics_back_to_the_checkpoint(reference_run, run_args, tmp_path):
    """A SIGKILL after step 6 was logged but before its checkpoint: the resumed run redoes steps 4-6, and
    metrics.jsonl holds each step once (and no partly written line)."""
    out = _copy_run(reference_run, tmp_path)
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    (out / "checkpoints" / "latest").write_text("step_00000003")
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "lo')
    train(TrainConfig(**run_args, out_dir=str(out), resume="latest"))
    assert [record["step"] for record in _metrics(out)] == [1, 2, 3, 4, 5, 6]


def test_a_failed_start_leaves_the_run_folder_untouched(reference_run, run_args, tmp_path, capsys):
    out = _copy_run(reference_run, tmp_path)
    before = _digests(out)
    code, err = _cli(["train", *_flags({**run_args, "tokenizer": tmp_path / "tokenzier", "out_dir": out}),
                      "--resume"], capsys)
    assert code == 2 and "tokenizer folder" in err and "does not exist" in err
    assert _digests(out) == before  # train_config.json still holds the settings the run was trained with


def test_max_steps_zero_is_a_usage_error(run_args, tmp_path, capsys):
    code, err = _cli(["train", *_flags({**run_args, "max_steps": 0, "out_dir": tmp_path / "run"})], capsys)
    assert code == 2 and "max_steps must be >= 1 (got 0)" in err
    assert not (tmp_path / "run").exists()


# 8. model and optimiser settings


def test_unknown_model_override_keys_are_rejected(run_args, tmp_path, capsys):
    settings = {**run_args, "model_overrides": {"hidden_sise": 8}, "out_dir": tmp_path / "run"}
    code, err = _cli(["train", *_flags(settings)], capsys)
    assert code == 2
    (line,) = err.splitlines()
    assert "model_overrides has unknown key(s) ['hidden_sise'] for EFLAConfig" in line and "'hidden_size'" in line
    assert not (tmp_path / "run").exists()


def test_resume_refuses_another_model_config(reference_run, run_args, tmp_path, capsys):
    out = _copy_run(reference_run, tmp_path)
    before = _digests(out)
    code, err = _cli(["train", *_flags({**run_args, "model_overrides": {"attn_mode": "delta"}, "out_dir": out}),
                      "--resume"], capsys)
    assert code == 2
    assert "the model config differs from the checkpoint's (attn_mode 'efla' -> 'delta')" in err
    assert _digests(out) == before


def test_resume_applies_and_reports_a_new_learning_rate(reference_run, run_args, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference_run / "checkpoints" / "step_00000003", out / "checkpoints" / "step_00000003")
    new_lr = run_args["lr"] / 10
    train(TrainConfig(**{**run_args, "lr": new_lr}, out_dir=str(out), resume=str(out / "checkpoints" /
                                                                                 "step_00000003")))
    assert f"lr {run_args['lr']!r} -> {new_lr!r}" in capsys.readouterr().err
    resumed, reference = _metrics(out), {r["step"]: r for r in _metrics(reference_run)}
    for record in resumed:
        assert record["lr"] == pytest.approx(reference[record["step"]]["lr"] / 10, rel=1e-12)
    assert resumed[1]["loss"] != reference[5]["loss"]  # the smaller steps changed the training


# 9. signals


def test_a_signal_stopped_run_exits_non_zero_and_says_how_to_resume(run_args, tmp_path, monkeypatch, capsys):
    real_step = _Run._train_step

    def step_then_sigint(self):
        record = real_step(self)
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # caught by the trainer's handler: it stops after this step
        return record

    monkeypatch.setattr(_Run, "_train_step", step_then_sigint)
    code, err = _cli(["train", *_flags({**run_args, "out_dir": tmp_path / "run"})], capsys)
    assert code == 128 + signal.SIGINT
    assert "stopped by SIGINT after step 2 of 6" in err and "continue with the same command and --resume" in err
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000002"


# 7. config files


def _config(tmp_path: Path, name: str, text: str, *flags: str) -> TrainConfig:
    (tmp_path / name).write_text(text)
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(["--config", str(tmp_path / name), *flags]))


BASE_YAML = "tokenizer: tok\ndata: corpus/\nmax_steps: 5\n"


@pytest.mark.parametrize(("line", "field", "value"), [
    ('compile: "no"', "compile", False),
    ("compile: yes", "compile", True),
    ('pack_boundaries: "false"', "pack_boundaries", False),
    ("pack_boundaries: 0", "pack_boundaries", False),
    ("lr: 1e-3", "lr", 1e-3),  # a string in YAML 1.1
    ('max_steps: "2"', "max_steps", 2),
    ("max_steps: 2.0", "max_steps", 2),
    ("warmup_steps: 1e2", "warmup_steps", 100),
])
def test_config_values_are_converted_to_their_field_type(line, field, value, tmp_path):
    pytest.importorskip("yaml")
    config = _config(tmp_path, "run.yaml", BASE_YAML + line + "\n")
    assert getattr(config, field) == value and type(getattr(config, field)) is type(value)


@pytest.mark.parametrize(("line", "message"), [
    ("max_steps: 2.7", "max_steps must be an integer (got 2.7)"),
    ('compile: "maybe"', "compile must be true or false (got 'maybe')"),
    ("pack_boundaries: 2", "pack_boundaries must be true or false (got 2)"),
    ("lr: fast", "lr must be a number (got 'fast')"),
    ("lr: .nan", "lr must be a finite number"),
    ("seq_len: true", "seq_len must be an integer (got True)"),
    ("tokenizer: 12", "tokenizer must be a string (got 12)"),
    ("model_overrides: [1, 2]", "model_overrides must be a mapping"),
])
def test_config_values_of_the_wrong_type_are_named(line, message, tmp_path, capsys):
    pytest.importorskip("yaml")
    budget = "" if line.startswith("max_steps") else "max_steps: 5\n"
    (tmp_path / "run.yaml").write_text(f"tokenizer: tok\ndata: corpus/\n{budget}{line}\n")
    code, err = _cli(["train", "--config", str(tmp_path / "run.yaml")], capsys)
    assert code == 2
    (error_line,) = err.splitlines()
    assert message in error_line


@pytest.mark.parametrize(("name", "text", "message"), [
    ("run.yaml", "tokenizer: tok\ndata: [corpus/\n", r"run.yaml is not valid YAML: .* at line 3"),
    ("run.json", '{"tokenizer": "tok",}', r"run.json is not valid JSON: .* at line 1"),
    ("run.cfg", "[section]\nkey = {value", r"run.cfg is neither JSON nor YAML"),
    ("run.yaml", "- a\n- b\n", r"run.yaml must hold a mapping of TrainConfig fields \(got list\)"),
])
def test_broken_config_files_are_named_in_one_line(name, text, message, tmp_path, capsys):
    pytest.importorskip("yaml")
    (tmp_path / name).write_text(text)
    code, err = _cli(["train", "--config", str(tmp_path / name)], capsys)
    assert code == 2
    (line,) = err.splitlines()
    assert re.search(message, line), line


# 4. the tokenizer's output


def test_tokenizer_train_never_reports_a_save_it_did_not_make(corpus, tmp_path, capsys):
    taken = tmp_path / "notes.txt"
    taken.write_text("my notes")
    code, err = _cli(["tokenizer", "train", "--data", str(corpus), "--out", str(taken), "--vocab-size", "300"],
                     capsys)
    assert code == 2 and f"--out {taken} is a file" in err
    assert taken.read_text() == "my notes"
    folder = tmp_path / "tok"
    assert _cli(["tokenizer", "train", "--data", str(corpus), "--out", str(folder), "--vocab-size", "300"],
                capsys)[0] == 0
    saved = _digests(folder)
    code, err = _cli(["tokenizer", "train", "--data", str(corpus), "--out", str(folder), "--vocab-size", "280"],
                     capsys)
    assert code == 2 and "already holds a tokenizer" in err and "--overwrite" in err
    assert _digests(folder) == saved
    assert _cli(["tokenizer", "train", "--data", str(corpus), "--out", str(folder), "--vocab-size", "280",
                 "--overwrite"], capsys)[0] == 0
    assert len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]) == 280


# 11. devices


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_one_line_error(run_args, tmp_path, capsys):
    code, err = _cli(["train", *_flags({**run_args, "device": "cuda", "out_dir": tmp_path / "run"})], capsys)
    assert code == 2
    (line,) = err.splitlines()
    assert "device 'cuda' needs a CUDA GPU" in line and "use device cpu or auto" in line
    code, err = _cli(["train", *_flags({**run_args, "device": "gpu0", "out_dir": tmp_path / "run"})], capsys)
    assert code == 2 and "device must be auto, cpu, cuda or cuda:N (got 'gpu0')" in err


@pytest.mark.parametrize(("content", "message"), [
    ('{"text": "fine"}\n{"text": "cut off\n', ":2: not valid JSON"),
    ('{"text": "fine"}\n\n{"text": 42}\n', ":3: field 'text' holds int 42, not text"),
])
def test_a_malformed_corpus_line_is_named(content, message, run_args, tmp_path, capsys):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text(content)
    settings = {**run_args, "data": [corpus], "cache_dir": tmp_path / "cache", "out_dir": tmp_path / "run"}
    code, err = _cli(["train", *_flags(settings)], capsys)
    assert code == 2
    (line,) = [line for line in err.splitlines() if "error" in line]
    assert f"{corpus}{message}" in line


def test_resume_past_the_run_s_last_step_is_refused(reference_run, run_args, tmp_path):
    """A lower --max-steps on --resume would end at once and save the checkpoint as the finished model."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference_run / "checkpoints" / "step_00000003", out / "checkpoints" / "step_00000003")
    with pytest.raises(ValueError, match="past this run's 2 steps"):
        train(TrainConfig(**{**run_args, "max_steps": 2}, out_dir=str(out),
                          resume=str(out / "checkpoints" / "step_00000003")))
    assert not (out / "model").exists()
