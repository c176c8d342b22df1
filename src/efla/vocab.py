"""The one check that a tokenizer fits a model: every token id it can produce must index the model's embedding
(a larger tokenizer otherwise ends in an IndexError deep inside the first forward pass)."""

from __future__ import annotations


def check_tokenizer_fits(tokenizer_size: int, vocab_size: int, change: str) -> None:
    """Raise ValueError naming both sizes and ``change`` (what the user should do) when a tokenizer of
    ``tokenizer_size`` tokens (``len(tokenizer)``, added tokens included) has ids past ``vocab_size``."""
    if tokenizer_size > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer_size} tokens but the model's vocab_size is {vocab_size}; "
                         f"{change}")
