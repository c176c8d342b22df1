"""``efla tokenizer train``: build a byte-level BPE tokenizer from local text with the `tokenizers` library."""

from __future__ import annotations

import argparse
from pathlib import Path

from efla.train.data import expand_paths, read_documents
from efla.train.tokenizer import train_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``efla tokenizer train --data FILES --out FOLDER [--vocab-size N]``."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = actions.add_parser("train", help=__doc__.split(": ", 1)[1], description=__doc__)
    build.add_argument("--data", nargs="+", required=True,
                       help=".txt/.md/.rst files (one document each), .jsonl, .parquet, folders or glob patterns")
    build.add_argument("--out", type=Path, required=True, help="folder to save the tokenizer in")
    build.add_argument("--vocab-size", type=int, default=32000, help="default 32000")
    build.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to merge (default 2)")
    build.add_argument("--text-field", default="text", help="jsonl/parquet field with the text (default text)")


def run(args: argparse.Namespace) -> None:
    """Train and save the tokenizer; one-line errors for missing or unreadable input."""
    try:
        files = expand_paths(args.data)
        tokenizer = train_tokenizer(read_documents(files, args.text_field), args.out, args.vocab_size,
                                    args.min_frequency)
    except (ValueError, FileNotFoundError, ImportError) as error:
        raise SystemExit(f"efla tokenizer train: error: {error}") from error
    print(f"saved a {len(tokenizer)}-token byte-level BPE tokenizer to {args.out}")
