"""Zero-shot and few-shot evaluation of a checkpoint with EleutherAI's lm-evaluation-harness (``efla[eval]``).

Importing efla registers model_type "efla" with transformers' Auto classes, so the harness's own Hugging Face model
("hf", HFLM) loads an EFLA checkpoint folder as it loads any causal LM; no wrapper is needed. The tasks in
``TASKS_DIR`` (tiny local tasks that need no hub access) are always available next to the harness's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from efla.device import resolve_device
from efla.eval.loading import check_checkpoint, load_matching_tokenizer, tokenizer_folder

TASKS_DIR = Path(__file__).parent / "tasks"


def evaluate_tasks(
    model: str | Path,
    tasks: list[str],
    tokenizer: str | Path | None = None,
    batch_size: int | str = 1,
    limit: float | None = None,
    num_fewshot: int | None = None,
    device: str | None = None,
    include_path: list[str | Path] | None = None,
    builtin_tasks: bool = True,
    prefix_token_id: int | None = None,
) -> dict[str, Any]:
    """Run ``lm_eval.simple_evaluate`` on the checkpoint folder ``model``; returns its result dict ("results" holds
    the metrics per task).

    Args:
        tasks: harness task or group names (or globs), e.g. ["lambada_openai", "piqa"] or ["efla_smoke_mc"].
        tokenizer: a tokenizer folder when the checkpoint has none.
        batch_size: an int, or "auto" (the harness finds the largest that fits).
        limit: at most this many documents per task (a fraction of each task when < 1).
        num_fewshot: examples in the prompt (default: each task's own).
        device: default CUDA when available; the model runs in bfloat16 there and float32 on CPU.
        include_path: more folders of task YAMLs.
        builtin_tasks: index the harness's own tasks too (most need the hub; indexing them takes seconds).
        prefix_token_id: the token rolling log-likelihoods (perplexity tasks) start from; default the tokenizer's
            eos, the token the trainer puts between documents (the harness would use bos).
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    import efla.models  # noqa: F401  (registers model_type "efla" with the Auto classes)

    device = str(resolve_device(device))  # a clear error before the harness starts
    folder = check_checkpoint(model)
    tokenizer_path = tokenizer_folder(folder, tokenizer)
    tokenizer_obj = load_matching_tokenizer(folder, tokenizer)  # the sizes checked before the harness starts
    if prefix_token_id is None:
        prefix_token_id = tokenizer_obj.eos_token_id
    task_manager = TaskManager(include_path=[str(TASKS_DIR), *map(str, include_path or [])],
                               include_defaults=builtin_tasks)
    missing = [task for task in tasks if not task_manager.match_tasks([task])]
    if missing:
        hint = "" if builtin_tasks else " (the harness's own tasks are switched off)"
        raise ValueError(f"unknown task(s) {', '.join(missing)}{hint}; list them with `lm-eval ls tasks`, or add a "
                         "folder of task YAMLs with include_path")
    model_args: dict[str, Any] = {
        "pretrained": str(folder), "tokenizer": str(tokenizer_path), "backend": "causal",
        "dtype": "float32" if device == "cpu" else "bfloat16",
    }
    if prefix_token_id is not None:
        model_args["prefix_token_id"] = prefix_token_id
    return lm_eval.simple_evaluate(
        model="hf", model_args=model_args, tasks=tasks, num_fewshot=num_fewshot, batch_size=batch_size,
        device=device, limit=limit, task_manager=task_manager, log_samples=False,
    )
