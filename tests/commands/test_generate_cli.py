"""``efla generate`` as a user meets it: the prompt and its continuation printed so that they read apart, and every
bad argument or input a one-line usage error (exit code 2) before the weights load."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from command_line import run_efla
from transformers import AutoTokenizer

from efla.models import EFLAForCausalLM, preset_config
from efla.train.tokenizer import train_tokenizer

TEXT = ["the quick brown fox jumps over the lazy dog", "a tiny model writes tiny words", "the fox and the dog"] * 20


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A tiny random EFLA model and a byte-level BPE tokenizer (built here, no download) in one folder."""
    folder = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = train_tokenizer(iter(TEXT), folder, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    config = preset_config("tiny", vocab_size=len(tokenizer), initializer_range=0.1, eos_token_id=None,
                           pad_token_id=tokenizer.pad_token_id)
    EFLAForCausalLM(config).save_pretrained(folder)
    return folder



def _usage_error(argv: list[str], capsys) -> str:
    code, out, err = run_efla(["generate", *argv], capsys)
    assert code == 2, err
    (line,) = err.splitlines()
    assert line.startswith("efla generate: error: ") and not out, err
    return line


def test_prints_the_prompt_and_each_greedy_continuation_apart(saved_model, capsys):
    code, out, err = run_efla(["generate", "--model", str(saved_model), "--prompt", "the fox", "--max-new-tokens", "6",
                            "--batch-size", "2", "--device", "cpu"], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    tokenizer = AutoTokenizer.from_pretrained(str(saved_model))
    model = EFLAForCausalLM.from_pretrained(str(saved_model)).eval()
    ids = tokenizer("the fox", return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    whole = tokenizer.decode(expected[0], skip_special_tokens=True)  # prompt and continuation decoded together
    assert whole.startswith("the fox") and len(whole) > len("the fox")
    assert lines[:3] == ["prompt: the fox", f"continuation [0]: {whole[len('the fox'):]}",
                         f"continuation [1]: {whole[len('the fox'):]}"]
    assert "tokens/s" in lines[3] and "(cpu, float32)" in lines[3]

    code, out, err = run_efla(["generate", "--model", str(saved_model), "--prompt", "the fox", "--max-new-tokens", "6",
                            "--device", "cpu"], capsys)
    assert code == 0, err
    assert out.splitlines()[:2] == ["prompt: the fox", f"continuation: {whole[len('the fox'):]}"]


def test_bad_arguments_are_one_line_usage_errors(saved_model, tmp_path, capsys):
    model = ["--model", str(saved_model), "--device", "cpu"]
    assert "--max-new-tokens must be >= 1 (got 0)" in _usage_error([*model, "--prompt", "x", "--max-new-tokens", "0"],
                                                                   capsys)
    assert "--top-p must be in (0, 1]" in _usage_error([*model, "--prompt", "x", "--top-p", "2"], capsys)
    assert "device must be auto, cpu, cuda or cuda:N (got 'tpu')" in _usage_error(
        ["--model", str(saved_model), "--prompt", "x", "--device", "tpu"], capsys)
    assert "--prompt encodes to no tokens" in _usage_error([*model, "--prompt", ""], capsys)
    line = _usage_error(["--model", str(tmp_path / "missing"), "--prompt", "x", "--device", "cpu"], capsys)
    assert f"model folder {tmp_path / 'missing'} does not exist" in line
    code, _, err = run_efla(["generate", "--model", str(saved_model), "--prompt", "x", "--no-such-flag"], capsys)
    assert code == 2 and "unrecognized arguments: --no-such-flag" in err


def test_a_run_folder_points_to_its_model_folder(saved_model, tmp_path, capsys):
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(saved_model, run / "model")
    line = _usage_error(["--model", str(run), "--prompt", "x", "--device", "cpu"], capsys)
    assert f"{run} is a training run's folder, not a saved model: use {run / 'model'}" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu(saved_model, capsys):
    line = _usage_error(["--model", str(saved_model), "--prompt", "x", "--device", "cuda"], capsys)
    assert "device 'cuda' needs a CUDA GPU, but none is available" in line and "use device cpu or auto" in line


def test_a_tokenizer_larger_than_the_model_vocabulary(saved_model, tmp_path, capsys):
    small = tmp_path / "small"
    tokens = len(AutoTokenizer.from_pretrained(str(saved_model)))
    EFLAForCausalLM(preset_config("tiny", vocab_size=tokens - 44)).save_pretrained(small)
    capsys.readouterr()  # transformers' own progress output
    line = _usage_error(["--model", str(small), "--tokenizer", str(saved_model), "--prompt", "x", "--device", "cpu"],
                        capsys)
    assert f"the tokenizer has {tokens} tokens but the model's vocab_size is {tokens - 44}" in line
    assert "--tokenizer" in line
