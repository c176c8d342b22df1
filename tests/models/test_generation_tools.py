"""`efla generate` on a tiny saved model with a local byte-level tokenizer, and benchmarks/generation.py on the CPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from transformers import AutoTokenizer

from efla.cli import main
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


def test_generate_cli_prints_greedy_text_and_speed(saved_model, capsys):
    main(["generate", "--model", str(saved_model), "--prompt", "the fox", "--max-new-tokens", "6",
          "--batch-size", "2", "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    tokenizer = AutoTokenizer.from_pretrained(str(saved_model))
    model = EFLAForCausalLM.from_pretrained(str(saved_model)).eval()
    ids = tokenizer("the fox", return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    text = "the fox" + tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
    assert lines[:2] == [f"[0] {text}", f"[1] {text}"]
    assert "tokens/s" in lines[2] and "(cpu, float32)" in lines[2]


def test_generate_cli_errors(saved_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(saved_model), "--prompt", "x", "--max-new-tokens", "0"])
    assert exit_info.value.code == 2
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="does not exist"):
        main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x", "--device", "cpu"])


def test_generation_benchmark_smoke_run(tmp_path, monkeypatch):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "generation.py"
    monkeypatch.syspath_prepend(str(path.parent))  # its sibling results_io.py, as when run as a script
    spec = importlib.util.spec_from_file_location("generation_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    out = tmp_path / "rows.jsonl"
    rows = benchmark.main(["--preset", "tiny", "--device", "cpu", "--batch-sizes", "2", "1",
                           "--prompt-lens", "8", "--new-tokens", "2", "--repeats", "1", "--out", str(out)])
    expected = ["efla eager", "efla graph", "efla graph hf", "llama sdpa"]  # fla DeltaNet needs CUDA
    # shapes outer, in the order given, models inner: a run cut short keeps side-by-side rows
    assert [(r["batch"], r["model"]) for r in rows] == [(b, m) for b in (2, 1) for m in expected]
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    llama, efla = (next(r["params"] for r in rows if r["model"] == name) for name in ("llama sdpa", "efla eager"))
    assert abs(llama - efla) / efla < 0.05  # same-size baseline
