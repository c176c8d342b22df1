"""Tokenizers: train a byte-level BPE from local text (no network; needs only the `tokenizers` package) and load a
Hugging Face tokenizer from a folder."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
_FILES = ("tokenizer.json", "tokenizer_config.json")


def train_bpe(
    texts: Iterator[str], out_dir: str | Path, vocab_size: int = 32000, min_frequency: int = 2,
    overwrite: bool = False,
) -> int:
    """Train a byte-level BPE tokenizer (GPT-2 style: any byte string is encodable) on ``texts`` and save it to
    ``out_dir`` as tokenizer.json + tokenizer_config.json, a folder AutoTokenizer loads. Uses only `tokenizers`.

    Special tokens: <s> (bos, id 0), </s> (eos, id 1), <pad> (id 2); the vocabulary also holds the 256 bytes, so
    vocab_size must be at least 259. ``out_dir`` must not be a file, nor hold a tokenizer unless ``overwrite``
    (checked before training). Returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out_dir = Path(out_dir).expanduser()
    check_tokenizer_out(out_dir, overwrite)
    if vocab_size < 259:
        raise ValueError(f"vocab_size must be >= 259: 256 bytes and 3 special tokens (got {vocab_size})")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.get_vocab_size() <= 259:
        raise ValueError("the training text is empty or too short to learn any merge")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tokenizer.get_vocab_size()


def check_tokenizer_out(out_dir: Path, overwrite: bool) -> None:
    """Refuse an output path that is a file, or a folder already holding a tokenizer (unless ``overwrite``)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; pass a folder to save the tokenizer in")
    held = [name for name in _FILES if (out_dir / name).exists()]
    if held and not overwrite:
        raise ValueError(f"--out {out_dir} already holds a tokenizer ({', '.join(held)}); pass --overwrite to "
                         "replace it, or another folder")
    if out_dir.is_dir() and not os.access(out_dir, os.W_OK):
        raise ValueError(f"--out {out_dir} is not writable; pass another folder")


def train_tokenizer(
    texts: Iterator[str], out_dir: str | Path, vocab_size: int = 32000, min_frequency: int = 2,
    overwrite: bool = False,
) -> Any:
    """``train_bpe``, then the saved tokenizer loaded as a transformers ``PreTrainedTokenizerFast``."""
    train_bpe(texts, out_dir, vocab_size, min_frequency, overwrite)
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | Path) -> Any:
    """The Hugging Face tokenizer saved in the folder ``path`` (local only, never downloaded)."""
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist; pass the folder of a saved Hugging Face "
                                "tokenizer, or build one with `efla tokenizer train --data FILES --out FOLDER`")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"could not load a tokenizer from {path}: {error}") from error
