"""Training EFLA language models: corpora, packing, the DDP/FSDP2 trainer and checkpoints (needs ``transformers``).

Python use: ``efla.train.train(TrainConfig(tokenizer=..., data=[...], max_steps=...))``; command line: ``efla train``.
"""

from efla.train.config import TrainConfig
from efla.train.loop import train
from efla.train.tokenizer import load_tokenizer, train_tokenizer

__all__ = ["TrainConfig", "load_tokenizer", "train", "train_tokenizer"]
