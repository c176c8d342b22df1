"""A study's output folder, kept safe: proven writable before any training, never overwritten unless asked, and
every result file replaced atomically, so that a crash or a kill keeps what was done."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path


def prepare_output_folder(out: Path, produces: tuple[str, ...], overwrite: bool) -> None:
    """Create ``out`` and prove it writable by writing and deleting a file; refuse if it already holds any of the
    files this study ``produces`` unless ``overwrite``. Raises ValueError with a one-line message."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as error:
        raise ValueError(f"--out {out} is not a writable folder ({error.strerror or error}); choose another") from None
    existing = [name for name in produces if (out / name).exists()]
    if existing and not overwrite:
        raise ValueError(f"--out {out} already holds {', '.join(existing)} from an earlier study; choose a new --out "
                         "or pass --overwrite to replace them")  # fmt: skip


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename: a reader (or a crash)
    sees the old file or the new one, never half of one."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(text)
    os.replace(f.name, path)


def write_json_atomic(path: Path, data: dict) -> None:
    """``data`` as indented JSON, atomically; non-finite floats (a learning rate of inf) become the strings "inf",
    "-inf" and "nan", since JSON has no such numbers."""
    write_text_atomic(path, json.dumps(_finite_or_text(data), indent=1, allow_nan=False) + "\n")


def _finite_or_text(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite_or_text(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_text(item) for item in value]
    return value
