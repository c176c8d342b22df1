"""Training EFLA language models: corpora, packing, the DDP/FSDP2 trainer and checkpoints (needs ``transformers``).

Python use: ``efla.train.train(TrainConfig(tokenizer=..., data=[...], max_steps=...))``; command line: ``efla train``.
The names below are imported on first use, so that ``efla tokenizer train`` needs only the `tokenizers` package.
"""

import importlib
from typing import Any

_EXPORTS = {"TrainConfig": "efla.train.config", "train": "efla.train.loop", "load_tokenizer": "efla.train.tokenizer",
            "train_tokenizer": "efla.train.tokenizer"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'efla.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
