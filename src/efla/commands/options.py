"""argparse types and options that several commands share; each bad value is one line naming what to change."""

from __future__ import annotations

import argparse
from pathlib import Path

from efla.device import resolve_device


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
    (``efla.device.resolve_device``), kept as text for results files."""
    try:
        return str(resolve_device(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_output_arguments(parser: argparse.ArgumentParser, default: Path) -> None:
    """--out and --overwrite of a study's output folder."""
    parser.add_argument("--out", type=Path, default=default, help=f"output folder (default {default})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier study in --out (default: refuse)")  # fmt: skip


def check_new_file(path: Path | None, overwrite: bool, flag: str = "--output") -> None:
    """Refuse an output file that exists unless ``overwrite`` (raises ValueError naming ``flag``), before any work."""
    if path is None:
        return
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise ValueError(f"{flag} {path} already exists; choose another file or pass --overwrite to replace it")
