"""What the study commands (``efla smnist``, ``efla mqar``) share: argument types, the device choice, and an output
folder kept safe.

The rules they follow: a bad argument is one line naming it (exit code 2); the output folder is proven writable
before any training and is never overwritten unless asked; results are written after every finished run, each file
replaced atomically, so a crash or a kill keeps what was done; a study with any unfinished run exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

from efla.device import resolve_device


def usage_error(command: str, message: str) -> NoReturn:
    """Print ``efla COMMAND: error: MESSAGE`` on stderr and exit with argparse's usage-error code, 2."""
    print(f"efla {command}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite or infinite float > 0 (inf is allowed: it is how a divergence is provoked on purpose)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {text})")
    return value


def device_name(text: str) -> str:
    """argparse type: "auto" (CUDA if torch sees a GPU, else CPU) or a torch device name usable on this machine
    (``efla.device.resolve_device``), kept as text for results.json."""
    try:
        return str(resolve_device(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_output_arguments(parser: argparse.ArgumentParser, default: Path) -> None:
    """--out and --overwrite."""
    parser.add_argument("--out", type=Path, default=default, help=f"output folder (default {default})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier study in --out (default: refuse)")  # fmt: skip


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
