"""``efla tokenizer train``: build a byte-level BPE tokenizer from local text with the `tokenizers` library."""

from __future__ import annotations

import argparse
from pathlib import Path

from efla.commands import CommandError, missing_extra


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``efla tokenizer train --data FILES --out FOLDER [--vocab-size N] [--overwrite]``."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = actions.add_parser("train", help=__doc__.split(": ", 1)[1], description=__doc__, allow_abbrev=False)
    build.add_argument("--data", nargs="+", required=True,
                       help=".txt/.md/.rst files (one document each), .jsonl, .parquet, folders or glob patterns")
    build.add_argument("--out", type=Path, required=True, help="folder to save the tokenizer in")
    build.add_argument("--overwrite", action="store_true", help="replace a tokenizer already saved in --out")
    build.add_argument("--vocab-size", type=int, default=32000, help="default 32000")
    build.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to merge (default 2)")
    build.add_argument("--text-field", default="text", help="jsonl/parquet field with the text (default text)")


def run(args: argparse.Namespace) -> None:
    """Train and save the tokenizer; one-line errors for missing or unreadable input or a taken --out."""
    from efla.train.data import expand_paths, read_documents

    try:
        from efla.train.tokenizer import train_bpe

        files = expand_paths(args.data)
        size = train_bpe(read_documents(files, args.text_field), args.out, args.vocab_size, args.min_frequency,
                         args.overwrite)
    except ModuleNotFoundError as error:
        raise missing_extra(error, "hf") from error
    except (ValueError, OSError) as error:
        raise CommandError(str(error)) from error
    print(f"saved a {size}-token byte-level BPE tokenizer to {args.out}")
