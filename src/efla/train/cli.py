"""``efla train``: train an EFLA language model on one process or under torchrun (DDP or FSDP2).

Settings come from ``--config FILE`` (YAML or JSON, keys as TrainConfig's fields) and/or flags, flags winning.
Examples:
  efla train --tokenizer tok/ --data corpus/ --model 340M --seq-len 2048 --micro-batch-size 8 --max-tokens 1000000000
  torchrun --nproc_per_node 8 -m efla train --config run.yaml --strategy fsdp
"""

from __future__ import annotations

import argparse

from efla.train.config import add_config_arguments, config_from_args
from efla.train.loop import BatchTooLargeError, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``efla train`` options: --config and one flag per TrainConfig field."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> None:
    """Build the TrainConfig and train; exits with a one-line message (no traceback) on bad settings or input."""
    try:
        config = config_from_args(args)
        train(config)
    except (ValueError, FileNotFoundError, ImportError, BatchTooLargeError) as error:
        raise SystemExit(f"efla train: error: {error}") from error
