"""Perplexity and bits per byte of a causal language model on held-out text.

Every document is tokenised on its own and preceded by one document-start token (the eos token by default: the
trainer separates documents with eos), so every token of the text is predicted and bits per byte covers all of its
bytes. A document longer than the context is cut into windows of ``context`` input tokens: the first scores its
targets, each next one ends ``stride`` tokens later (the last at the document's end) and scores only the targets
after the previous window's end. With stride == context these are disjoint chunks, except that the last one starts
``context`` tokens before the end (more context for its targets); with stride 1 every target is predicted from the
min(position, context) tokens before it. This is lm-eval's loglikelihood_rolling protocol (its context_len being
context - stride + 1), so both give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class PerplexityResult:
    """Summed negative log-likelihood (nats) of ``tokens`` scored tokens, whose documents hold ``bytes`` UTF-8 bytes."""

    nll: float
    tokens: int
    bytes: int
    documents: int
    context: int
    stride: int

    @property
    def perplexity(self) -> float:
        """exp(mean NLL per token): depends on the tokenizer."""
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        """Total NLL in bits per UTF-8 byte of text: comparable across tokenizers."""
        return self.nll / self.bytes / math.log(2)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    texts: Iterable[str],
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    prefix_token_id: int | None = None,
    bf16_autocast: bool = True,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity and bits per byte of ``model`` (a transformers causal LM) on ``texts`` (one string per document).

    Args:
        tokenizer: a transformers tokenizer (called with add_special_tokens=False).
        context: input tokens per window; default ``model.config.max_position_embeddings``.
        stride: tokens between window starts, 1..context; default context (disjoint chunks).
        batch_size: windows per forward pass (rows are right-padded: harmless for a causal model).
        prefix_token_id: the token every document is predicted from; default the tokenizer's eos, else its bos.
        bf16_autocast: on CUDA, run under bfloat16 autocast (False: in the model's own dtype, as always on CPU).
        progress: show a tqdm bar over batches.

    Log-probabilities are taken in float32 and summed in float64. Empty documents are skipped; if all are empty it
    raises ValueError.
    """
    context = context if context is not None else getattr(model.config, "max_position_embeddings", None)
    if context is None or context < 1:
        raise ValueError(f"context must be a positive number of tokens (got {context}); pass context=")
    stride = context if stride is None else stride
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}] (got {stride})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    prefix = _prefix_token_id(tokenizer, prefix_token_id)

    texts = list(texts)
    if not all(isinstance(text, str) for text in texts):
        raise TypeError("texts must be strings, one per document")
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    documents, num_bytes = [], 0
    for text, ids in zip(texts, encoded, strict=True):
        if ids:
            documents.append(torch.tensor([prefix, *ids]))
            num_bytes += len(text.encode("utf-8"))
    if not documents:
        raise ValueError(f"no text to evaluate: all {len(texts)} documents are empty")

    # (document, begin, end, scored): inputs doc[begin:end]; targets doc[begin + 1:end + 1], the last `scored` count
    windows = [(i, *w) for i, doc in enumerate(documents) for w in _windows(len(doc) - 1, context, stride)]
    windows.sort(key=lambda w: w[2] - w[1], reverse=True)  # similar lengths together: less padding
    batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    device = next(model.parameters()).device
    autocast = bf16_autocast and device.type == "cuda"
    nll, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for batch in _progress(batches, progress):
            inputs, targets = _batch_tensors(documents, batch, fill=prefix)
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                logits = model(input_ids=inputs.to(device), use_cache=False).logits
            nll += F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(), ignore_index=-100,
                                   reduction="sum").item()
            tokens += sum(scored for *_, scored in batch)
    finally:
        model.train(was_training)
    return PerplexityResult(nll=nll, tokens=tokens, bytes=num_bytes, documents=len(documents), context=context,
                            stride=stride)


def _windows(num_targets: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, scored) of the windows over a document with ``num_targets`` targets (its tokens after the
    prefix): inputs [begin, end), scoring the targets end - scored + 1 .. end, each target in exactly one window."""
    end, scored_until = min(context, num_targets), 0
    while True:
        yield max(0, end - context), end, end - scored_until
        if end == num_targets:
            return
        scored_until, end = end, min(end + stride, num_targets)


def _batch_tensors(
    documents: list[torch.Tensor], batch: list[tuple[int, int, int, int]], fill: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs [B, T] and targets [B, T] (-100 where not scored) of a batch of windows."""
    length = max(end - begin for _, begin, end, _ in batch)
    inputs = torch.full((len(batch), length), fill, dtype=torch.long)
    targets = torch.full((len(batch), length), -100, dtype=torch.long)
    for row, (i, begin, end, scored) in enumerate(batch):
        inputs[row, :end - begin] = documents[i][begin:end]
        targets[row, end - begin - scored:end - begin] = documents[i][end - scored + 1:end + 1]
    return inputs, targets


def _prefix_token_id(tokenizer: Any, prefix_token_id: int | None) -> int:
    for candidate in (prefix_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if candidate is not None:
            return candidate
    raise ValueError("the tokenizer has neither an eos nor a bos token to start documents with; pass prefix_token_id")


def _progress(batches: list, enabled: bool) -> Iterable:
    if not enabled:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, desc="perplexity", unit="batch")
