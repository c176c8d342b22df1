"""The run folder (``--out-dir``) and what a resume may change: no run's finished work is replaced by accident.

A run folder holds ``checkpoints/``, ``model/``, ``metrics.jsonl``, ``train_config.json`` and optional logs. A new
run starts only in a folder without these outputs, unless ``--overwrite`` deletes them first; ``--resume``
continues the run in it, cutting ``metrics.jsonl`` back to the checkpoint's step so that redone steps are not
recorded twice. A new run that fails before its first step deletes the outputs it created, so that it does not block
its own rerun.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

# Everything a run writes into its folder (other files, e.g. the user's own config, are left alone by --overwrite).
RUN_OUTPUTS = ("checkpoints", "model", "metrics.jsonl", "train_config.json", "tensorboard", "wandb", "profile.txt",
               "profile_trace.json")
# Model config fields that change how a model runs, not what it computes: a resume may change them.
RUNTIME_MODEL_FIELDS = frozenset({
    "_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "attn_backend", "chunk_size",
    "use_cache", "activation_checkpointing", "output_attentions", "output_hidden_states", "return_dict",
})
# TrainConfig fields that say where or how to run, not what the run is: never reported as changed on resume.
_RUN_ONLY_SETTINGS = frozenset({"resume", "overwrite", "out_dir", "device", "cache_dir", "profile_steps"})


def check_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run in a folder that holds a run's outputs, unless resuming or overwriting (other files,
    such as a log or the run's own config, do not count)."""
    if resume or overwrite or not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} is a file; pass a folder for --out-dir")
    held = [name for name in RUN_OUTPUTS if _holds(out_dir / name)]
    if held:
        raise ValueError(f"out_dir {out_dir} already holds a run ({', '.join(held)}); continue it with --resume, "
                         "replace it with --overwrite, or choose another --out-dir")


def _holds(path: Path) -> bool:
    """A file, or a folder with anything in it."""
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def clear_outputs(out_dir: Path) -> list[str]:
    """Delete a previous run's outputs from ``out_dir`` (for --overwrite); returns the names deleted."""
    deleted = []
    for name in RUN_OUTPUTS:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        deleted.append(name)
    return deleted


def existing_outputs(out_dir: Path) -> set[str]:
    """The names of ``RUN_OUTPUTS`` present in ``out_dir`` (empty folders included)."""
    return {name for name in RUN_OUTPUTS if (out_dir / name).exists()}


def remove_new_outputs(out_dir: Path, before: set[str], remove_empty_folder: bool) -> list[str]:
    """Delete the run outputs in ``out_dir`` that were not there ``before`` (what a failed attempt created; what an
    earlier run left is kept), and with ``remove_empty_folder`` (the attempt created it) ``out_dir`` itself if that
    leaves it empty; returns the names deleted."""
    deleted = []
    for name in sorted(existing_outputs(out_dir) - before):
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        deleted.append(name)
    if remove_empty_folder and out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    return deleted


def truncate_metrics(path: Path, step: int) -> int:
    """Keep only the records of ``metrics.jsonl`` up to ``step`` (the checkpoint a run resumes from), dropping the
    steps that will be trained again and any partly written line; returns the number of lines dropped. The file is
    replaced atomically."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return dropped


def model_config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{field: (checkpoint's value, current value)} for the model config fields that differ, runtime fields aside."""
    names = (set(saved) | set(current)) - RUNTIME_MODEL_FIELDS
    return {name: (saved.get(name), current.get(name)) for name in sorted(names)
            if saved.get(name) != current.get(name)}


def setting_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{setting: (checkpoint's value, current value)} for the TrainConfig settings a resume changes."""
    names = (set(saved) & set(current)) - _RUN_ONLY_SETTINGS
    return {name: (saved[name], current[name]) for name in sorted(names) if saved[name] != current[name]}


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """``lr 0.001 -> 0.01, max_steps 6 -> 10`` (one line)."""
    return ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changes.items())
