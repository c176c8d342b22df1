"""``efla exactness``: the error of EFLA, Euler, RK2 and RK4 against the matrix exponential (float64, random
problems), as tables and plots (``efla.experiments.exactness``)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from pathlib import Path

from efla.commands import CommandError, missing_extra
from efla.experiments.exactness import ExactnessConfig, run_exactness

DEFAULTS = ExactnessConfig()


def _decay(text: str) -> float:
    """argparse type of --decay: -g, a decay per token, >= 0."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"-g is the decay per token and must be >= 0 (got {text})")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The study's knobs (ExactnessConfig's fields); the defaults take a few seconds on 2 CPU cores."""
    d = DEFAULTS
    parser.add_argument("--out", type=Path, default=Path("runs/exactness"), help="output folder (table.md, PNG)")
    parser.add_argument("--dim", type=int, default=d.dim, help="key and value dimension K = V")
    parser.add_argument("--batch", type=int, default=d.batch, help="independent random problems per measurement")
    parser.add_argument("--stiffness", type=float, nargs="+", default=d.stiffness,
                        help="beta * ||k||^2 values of the one-step sweep")
    parser.add_argument("--substeps", type=int, nargs="+", default=d.substeps,
                        help="sub-step counts n of the convergence sweep (h = beta / n)")
    parser.add_argument("--order-stiffness", type=float, default=d.order_stiffness,
                        help="beta * ||k||^2 per token, convergence")
    parser.add_argument("--order-length", type=int, default=d.order_length,
                        help="sequence length of the convergence sweep")
    parser.add_argument("--lengths", type=int, nargs="+", default=d.lengths,
                        help="sequence lengths of the length sweep, ascending")
    parser.add_argument("--length-stiffness", type=float, nargs="+", default=d.length_stiffness,
                        help="beta * ||k||^2 per token of the length sweep")
    parser.add_argument("--decay", type=_decay, nargs="+", default=d.decay,
                        help="-g values (log decay per token, >= 0 here) of the gated sweeps")
    parser.add_argument("--gated-stiffness", type=float, nargs="+", default=d.gated_stiffness,
                        help="beta * ||k||^2 values of the gated one-step sweep")
    parser.add_argument("--gated-length", type=int, default=d.gated_length,
                        help="sequence length of the gated sequence sweep (stiffness from --length-stiffness)")
    parser.add_argument("--seed", type=int, default=d.seed)


def run(args: argparse.Namespace) -> None:
    """Run the sweeps, write table.md, exactness.png and gated.png to ``args.out``, print the tables."""
    if importlib.util.find_spec("matplotlib") is None:  # before the work, not after the table: the plots need it
        raise missing_extra(ModuleNotFoundError(name="matplotlib"), "smnist")
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(ExactnessConfig)}
    try:
        config = ExactnessConfig(**{name: tuple(v) if isinstance(v, list) else v for name, v in values.items()})
    except ValueError as error:  # settings the sweeps cannot use (lengths out of order)
        raise CommandError(str(error)) from error
    table = run_exactness(config, args.out)
    print(table)
    print(f"wrote {args.out / 'table.md'}, {args.out / 'exactness.png'} and {args.out / 'gated.png'}")
