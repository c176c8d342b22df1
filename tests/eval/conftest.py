"""Shared fixtures: a byte-level BPE tokenizer trained here on a few sentences, and a tiny random EFLA checkpoint
(model + tokenizer) saved to a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from efla.models import EFLAForCausalLM, preset_config

TEXTS = [
    "A linear attention layer keeps a state of fixed size and updates it once for every token it reads.",
    "The delta rule erases what the state holds along the key, then writes the new value there.",
    "Taking the exact step instead of one Euler step keeps the state bounded for any key norm.",
    "Short line.",
    "Crème brûlée, naïve café, façade — non-ASCII text counts its UTF-8 bytes. ✓",
    "The boats waited by the bridge on a still morning, and the river carried the light downstream past the mill, "
    "the orchard and the old stone church, until the wind rose at noon and the sails filled one after another.",
]
CONTEXT = 16  # the checkpoint's max_position_embeddings: most texts span several windows


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's ops are too small to gain from threads, and on a busy machine their overhead dominates."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return list(TEXTS)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TEXTS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="session")
def model(tokenizer) -> EFLAForCausalLM:
    torch.manual_seed(0)
    config = preset_config("tiny", vocab_size=len(tokenizer), max_position_embeddings=CONTEXT,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    return EFLAForCausalLM(config).eval()


@pytest.fixture(scope="session")
def checkpoint(model, tokenizer, tmp_path_factory) -> Path:
    """A checkpoint folder as `efla train` writes its final model: weights, config and tokenizer."""
    folder = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
