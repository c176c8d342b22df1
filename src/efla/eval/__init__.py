"""Evaluation of language-model checkpoints: perplexity and bits per byte on held-out text, and lm-evaluation-harness
tasks (``efla eval ppl`` and ``efla eval harness`` are thin layers over these functions)."""

from efla.eval.harness import TASKS_DIR, evaluate_tasks
from efla.eval.loading import (
    check_checkpoint,
    dataset_texts,
    load_checkpoint,
    load_matching_tokenizer,
    load_model,
    read_texts,
    tokenizer_folder,
)
from efla.eval.perplexity import PerplexityResult, perplexity

__all__ = [
    "TASKS_DIR",
    "PerplexityResult",
    "check_checkpoint",
    "dataset_texts",
    "evaluate_tasks",
    "load_checkpoint",
    "load_matching_tokenizer",
    "load_model",
    "perplexity",
    "read_texts",
    "tokenizer_folder",
]
