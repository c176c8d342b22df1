"""Inputs of an evaluation: a checkpoint folder (model and tokenizer) and held-out text (local files or a dataset)."""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any

import torch

from efla.device import resolve_device
from efla.vocab import check_tokenizer_fits

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def check_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder ``path`` (a saved transformers model: config.json and weights), or a clear error; a run
    folder of ``efla train`` is pointed to its model/ folder."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist; pass a checkpoint folder holding config.json "
                                "and model.safetensors (e.g. the model/ folder an `efla train` run writes)")
    if not (path / "config.json").is_file():
        if (path / "model" / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a training run's folder, not a saved model: use {path / 'model'}")
        raise FileNotFoundError(f"{path} has no config.json: it is not a saved model (save it with save_pretrained)")
    return path


def tokenizer_folder(model: str | Path, tokenizer: str | Path | None = None) -> Path:
    """The folder to load the tokenizer from: ``tokenizer`` if given, else the checkpoint folder, which must hold one
    (a trainer's step_* checkpoints hold only the model; its final model/ folder holds both)."""
    folder = Path(tokenizer if tokenizer is not None else model)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        hint = "" if tokenizer is not None else "; pass the tokenizer folder (--tokenizer)"
        raise FileNotFoundError(f"no tokenizer in {folder} (none of {', '.join(_TOKENIZER_FILES)}){hint}")
    return folder


def load_matching_tokenizer(model: str | Path, tokenizer: str | Path | None = None) -> Any:
    """The tokenizer of the checkpoint folder ``model`` (from the folder ``tokenizer`` when given), checked against
    the model's config before any weights load: a tokenizer with more tokens than the model's vocab_size raises
    ValueError naming both sizes."""
    from transformers import AutoConfig, AutoTokenizer

    import efla.models  # noqa: F401  (registers model_type "efla" with the Auto classes)

    folder = check_checkpoint(model)
    source = tokenizer_folder(folder, tokenizer)
    tokenizer_obj = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    vocab_size = AutoConfig.from_pretrained(str(folder), local_files_only=True).vocab_size
    check_tokenizer_fits(len(tokenizer_obj), vocab_size, f"the tokenizer in {source} is not the one {folder} was "
                         "trained with; pass that one (--tokenizer)")
    return tokenizer_obj


def load_model(model: str | Path, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32) -> Any:
    """The model of the checkpoint folder ``model`` in ``dtype`` and eval mode on ``device`` (default CUDA when
    available)."""
    from transformers import AutoModelForCausalLM

    import efla.models  # noqa: F401  (registers model_type "efla" with the Auto classes)

    device = resolve_device(device)
    folder = check_checkpoint(model)
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True).to(device).eval()


def load_checkpoint(
    model: str | Path, tokenizer: str | Path | None = None, device: str | torch.device | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer) of a local checkpoint folder, the model in float32 and eval mode on ``device`` (default
    CUDA when available). ``tokenizer``: a tokenizer folder when the checkpoint has none. Raises before loading the
    weights for an unusable device, a missing folder or tokenizer, or a tokenizer that does not fit the model."""
    device = resolve_device(device)
    tokenizer_obj = load_matching_tokenizer(model, tokenizer)
    return load_model(model, device), tokenizer_obj


def trained_context(model: str | Path) -> int | None:
    """The sequence length the checkpoint folder ``model`` was trained at, from the train_config.json that
    ``efla train`` writes beside it (in ``model/``, its run folder, or the run folder of a ``checkpoints/step_*``);
    None when there is none."""
    folder = Path(model)
    for candidate in (folder, folder.parent, folder.parent.parent):
        path = candidate / "train_config.json"
        if path.is_file():
            try:
                seq_len = json.loads(path.read_text()).get("seq_len")
            except (OSError, ValueError, AttributeError):
                return None
            return seq_len if isinstance(seq_len, int) and seq_len > 0 else None
    return None


def read_texts(paths: list[str | Path], text_field: str = "text") -> list[str]:
    """The documents of local files, in order: a .jsonl file holds one per line (its ``text_field``), any other file
    is one document of UTF-8 text; a ``.gz`` suffix on either is read through gzip. Raises ValueError naming the file
    (and line) for unreadable or malformed input."""
    texts = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"text file {path} does not exist")
        try:
            text = _read_text(path)
        except (OSError, EOFError, zlib.error, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read text file {path}: {error}") from None
        if path.suffixes[-2:] not in ([".jsonl"], [".jsonl", ".gz"]):
            texts.append(text)
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}); each line must be a JSON object "
                                 "like {\"text\": \"...\"}") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"{path}:{number}: no string field {text_field!r} (set the text field)")
            texts.append(record[text_field])
    return texts


def _read_text(path: Path) -> str:
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as file:
            return file.read()
    return path.read_text(encoding="utf-8")


def dataset_texts(name: str, split: str = "test", config: str | None = None, text_field: str = "text") -> list[str]:
    """The ``text_field`` column of a Hugging Face ``datasets`` split (a hub name, or a local folder of data files)."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError("--dataset needs the datasets package: pip install 'efla[hf]'") from error
    data = datasets.load_dataset(name, config, split=split)
    if text_field not in data.column_names:
        raise ValueError(f"dataset {name} has no column {text_field!r} (columns: {data.column_names}); "
                         "set the text field")
    return list(data[text_field])
