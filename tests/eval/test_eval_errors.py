"""``efla eval``: every user error is one line naming the argument or file and what to change (exit code 2), as
``efla train``'s; gzip input, the trained context as the default window, an --output file kept unless --overwrite."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch
from command_line import run_efla

from efla.models import EFLAForCausalLM, preset_config


def _one_line_error(argv: list[str], capsys) -> str:
    code, _, err = run_efla(argv, capsys)
    assert code == 2, err
    (line,) = err.splitlines()
    assert line.startswith(f"efla eval {argv[1]}: error: "), line
    return line


@pytest.fixture
def jsonl(texts, tmp_path) -> Path:
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_missing_model_folder(jsonl, tmp_path, capsys):
    for action in (["ppl", "--files", str(jsonl)], ["harness", "--tasks", "efla_smoke_ppl"]):
        line = _one_line_error(["eval", action[0], "--model", str(tmp_path / "nope"), *action[1:]], capsys)
        assert f"model folder {tmp_path / 'nope'} does not exist" in line


def test_missing_tokenizer(model, jsonl, tmp_path, capsys):
    folder = tmp_path / "weights_only"
    model.save_pretrained(folder)
    capsys.readouterr()  # transformers' own progress output
    line = _one_line_error(["eval", "ppl", "--model", str(folder), "--files", str(jsonl)], capsys)
    assert f"no tokenizer in {folder}" in line and "--tokenizer" in line


@pytest.mark.parametrize(("content", "message"), [
    ('{"text": "fine"}\n{"text": "cut off\n', r":2: not valid JSON"),
    ('{"text": "fine"}\n\n{"text": 42}\n', r":3: no string field 'text'"),
])
def test_malformed_jsonl_names_file_and_line(content, message, checkpoint, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    line = _one_line_error(["eval", "ppl", "--model", str(checkpoint), "--files", str(path)], capsys)
    assert f"{path}{message}" in line


def test_gzip_input_and_a_broken_gzip_file(checkpoint, jsonl, tmp_path, capsys):
    packed = tmp_path / "held_out.jsonl.gz"
    packed.write_bytes(gzip.compress(jsonl.read_bytes()))
    plain = run_efla(["eval", "ppl", "--model", str(checkpoint), "--files", str(jsonl), "--device", "cpu"], capsys)
    zipped = run_efla(["eval", "ppl", "--model", str(checkpoint), "--files", str(packed), "--device", "cpu"], capsys)
    assert plain[0] == zipped[0] == 0 and plain[1].splitlines()[0] == zipped[1].splitlines()[0]
    broken = tmp_path / "broken.jsonl.gz"
    data = bytearray(gzip.compress(jsonl.read_bytes()))
    data[20:40] = bytes(20)  # an invalid deflate stream behind a valid header
    broken.write_bytes(bytes(data))
    line = _one_line_error(["eval", "ppl", "--model", str(checkpoint), "--files", str(broken)], capsys)
    assert f"cannot read text file {broken}" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu(checkpoint, jsonl, capsys):
    line = _one_line_error(["eval", "ppl", "--model", str(checkpoint), "--files", str(jsonl), "--device", "cuda"],
                           capsys)
    assert "device 'cuda' needs a CUDA GPU" in line
    line = _one_line_error(["eval", "harness", "--model", str(checkpoint), "--tasks", "efla_smoke_ppl", "--device",
                            "cuda"], capsys)
    assert "device 'cuda' needs a CUDA GPU" in line


def test_default_context_is_the_trained_seq_len(checkpoint, jsonl, tmp_path, capsys):
    """A model/ folder of a run (train_config.json beside it, seq_len 8) is scored in windows of 8 tokens, not of its
    max_position_embeddings (16)."""
    run = tmp_path / "run"
    shutil.copytree(checkpoint, run / "model")
    (run / "train_config.json").write_text(json.dumps({"seq_len": 8}))
    code, out, err = run_efla(["eval", "ppl", "--model", str(run / "model"), "--files", str(jsonl), "--device", "cpu"],
                          capsys)
    assert code == 0, err
    assert "context 8," in out
    code, out, _ = run_efla(["eval", "ppl", "--model", str(checkpoint), "--files", str(jsonl), "--device", "cpu"],
                            capsys)
    assert code == 0 and "context 16," in out


def test_output_file_is_kept_unless_overwrite(checkpoint, jsonl, tmp_path, capsys):
    """An existing --output file is refused before any work (one line naming --overwrite), replaced with it."""
    output = tmp_path / "ppl.json"
    output.write_text("earlier results\n")
    argv = ["eval", "ppl", "--model", str(checkpoint), "--files", str(jsonl), "--device", "cpu", "--output",
            str(output)]
    line = _one_line_error(argv, capsys)
    assert f"--output {output} already exists; choose another file or pass --overwrite" in line
    assert output.read_text() == "earlier results\n"
    code, _, err = run_efla([*argv, "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads(output.read_text())["perplexity"] > 1


def test_a_run_folder_points_to_its_model_folder(checkpoint, jsonl, tmp_path, capsys):
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(checkpoint, run / "model")
    for action in (["ppl", "--files", str(jsonl)], ["harness", "--tasks", "efla_smoke_ppl"]):
        line = _one_line_error(["eval", action[0], "--model", str(run), *action[1:], "--device", "cpu"], capsys)
        assert f"{run} is a training run's folder, not a saved model: use {run / 'model'}" in line


def test_a_tokenizer_larger_than_the_model_vocabulary(tokenizer, jsonl, tmp_path, capsys):
    """Refused before any text is read or weights load, naming both sizes (not an IndexError from the embedding)."""
    small = tmp_path / "small"
    EFLAForCausalLM(preset_config("tiny", vocab_size=len(tokenizer) - 20)).save_pretrained(small)
    tokenizer.save_pretrained(tmp_path / "tok")
    capsys.readouterr()  # transformers' own progress output
    expected = f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {len(tokenizer) - 20}"
    for action in (["ppl", "--files", str(tmp_path / "unread.jsonl")], ["harness", "--tasks", "efla_smoke_ppl"]):
        line = _one_line_error(["eval", action[0], "--model", str(small), "--tokenizer", str(tmp_path / "tok"),
                                *action[1:], "--device", "cpu"], capsys)
        assert expected in line and "--tokenizer" in line
