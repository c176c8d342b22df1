"""`efla tokenizer train`: a byte-level BPE tokenizer from local text that loads as a Hugging Face tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from efla.cli import main
from efla.train.tokenizer import load_tokenizer, train_tokenizer


def test_cli_trains_a_loadable_byte_level_bpe(corpus, tmp_path, capsys):
    main(["tokenizer", "train", "--data", str(corpus), "--out", str(tmp_path / "tok"), "--vocab-size", "300"])
    assert "300-token" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(tokenizer) == 300
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<s>", "</s>", "<pad>"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    # byte level: any text, even unseen scripts and emoji, round-trips exactly
    for text in ["The Python Software Foundation", "Grüße, 世界 🐍\n\ttabs", ""]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    # merges were learnt: common corpus words take fewer tokens than bytes
    assert len(tokenizer("the software license")["input_ids"]) < len("the software license")


def test_tokenizer_errors_are_clear(tmp_path, capsys):
    with pytest.raises(ValueError, match="vocab_size must be >= 259"):
        train_tokenizer(iter(["some text"]), tmp_path, vocab_size=100)
    with pytest.raises(ValueError, match="empty or too short"):
        train_tokenizer(iter([]), tmp_path, vocab_size=300)
    with pytest.raises(FileNotFoundError, match=r"does not exist.*efla tokenizer train"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(SystemExit) as exit_:
        main(["tokenizer", "train", "--data", str(tmp_path / "nothing*.txt"), "--out", str(tmp_path / "t")])
    assert exit_.value.code == 2 and "matches no file" in capsys.readouterr().err
