"""``efla train``: train an EFLA language model on one process or under torchrun (DDP or FSDP2).

Settings come from ``--config FILE`` (YAML or JSON, keys as TrainConfig's fields) and/or flags, flags winning.
Examples:
  efla train --tokenizer tok/ --data corpus/ --model 340M --seq-len 2048 --micro-batch-size 8 --max-tokens 1000000000
  torchrun --nproc_per_node 8 -m efla train --config run.yaml --strategy fsdp
"""

from __future__ import annotations

import argparse

from efla.commands import UNFINISHED, CommandError, missing_extra
from efla.train.config import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``efla train`` options: --config and one flag per TrainConfig field."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> None:
    """Build the TrainConfig and train. Bad settings or input are one-line usage errors (exit 2); a run that did not
    finish (diverged, out of memory: exit 1; stopped by a signal: 128 + the signal) says so and how to go on."""
    try:
        config = config_from_args(args)
        from efla.errors import TrainingDiverged
        from efla.train.loop import BatchTooLargeError, TrainingStopped, train
    except ModuleNotFoundError as error:
        raise missing_extra(error, "hf") from error
    except (ValueError, OSError) as error:
        raise CommandError(str(error)) from error
    try:
        train(config)
    except TrainingStopped as error:
        raise CommandError(str(error), code=128 + error.signum) from error
    except (TrainingDiverged, BatchTooLargeError) as error:
        raise CommandError(str(error), code=UNFINISHED) from error
    except ModuleNotFoundError as error:
        raise missing_extra(error, "hf") from error
    except (ValueError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError) as error:
        raise CommandError(str(error)) from error
