"""Tokenizers: train a byte-level BPE from local text (no network) and load a Hugging Face tokenizer from a folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def train_tokenizer(
    texts: Iterator[str], out_dir: str | Path, vocab_size: int = 32000, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style: any byte string is encodable) on ``texts`` and save it to
    ``out_dir`` as a Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) that AutoTokenizer loads.

    Special tokens: <s> (bos, id 0), </s> (eos, id 1), <pad> (id 2); the vocabulary also holds the 256 bytes, so
    vocab_size must be at least 259. Returns the saved tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

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
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    wrapped.save_pretrained(str(out_dir))
    return wrapped


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """The Hugging Face tokenizer saved in the folder ``path`` (local only, never downloaded)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist; pass the folder of a saved Hugging Face "
                                "tokenizer, or build one with `efla tokenizer train --data FILES --out FOLDER`")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"could not load a tokenizer from {path}: {error}") from error
