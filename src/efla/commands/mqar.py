"""``efla mqar``: multi-query associative recall (Zoology's MQAR) for 2-layer EFLA and DeltaNet language models, and
their decay-gated forms (--modes gated-efla gated-delta).

Each example lists key-value pairs, then asks for every key once; a model scores the share of answers it predicts
exactly. Examples are generated on the fly from the seed (no data files). With no arguments it runs a CPU smoke sweep
of a few minutes (sequence lengths 64 and 128, 16 pairs, d = 64, vocabulary 64, learning rates 3e-3 and 1e-2); --full
is the GPU sweep over sequence lengths 64..1024 and 4..64 pairs at d = 128. Any flag given with --full overrides
it. Writes results.json and recall.png to --out after every run and prints the table; refuses an --out that already
holds them unless --overwrite; exits non-zero if any run diverged. --merge DIR... trains nothing: it joins the
results of sweeps run apart (one process per mode or per GPU, the same models and training) into one table and plot
in --out.

Python use: ``efla.experiments.mqar.train.run_sweep(SweepConfig())``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from efla.commands import UNFINISHED, CommandError
from efla.commands.options import add_output_arguments, device_name, positive_float, positive_int
from efla.experiments.mqar.report import markdown_table, merge_results, plot_results
from efla.experiments.mqar.train import SweepConfig, run_sweep
from efla.experiments.outputs import prepare_output_folder, write_json_atomic, write_text_atomic
from efla.variants import VARIANTS

DEFAULTS = SweepConfig()
FULL = dataclasses.replace(
    DEFAULTS, seq_lens=(64, 128, 256, 512, 1024), num_pairs=(4, 16, 64), vocab_size=256, d_model=128, steps=1500,
    batch_size=64, lrs=(3e-3, 1e-2), eval_examples=1024,
)  # fmt: skip
OUTPUTS = ("results.json", "table.md", "recall.png")
_SWEPT = ("seq_lens", "num_pairs", "lrs", "modes")  # list-valued options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``efla mqar`` options; unset ones take the smoke sweep's values (SweepConfig) or, with --full, FULL's."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.allow_abbrev = False
    parser.set_defaults(**dict.fromkeys(f.name for f in dataclasses.fields(SweepConfig)))  # None: not given
    sweep = parser.add_argument_group("sweep (defaults: the CPU smoke run; --full: the GPU sweep)")
    sweep.add_argument("--full", action="store_true", help="the GPU sweep: " + _describe(FULL))
    sweep.add_argument("--modes", nargs="+", choices=list(VARIANTS),
                       help=f"token mixers (default {_join(DEFAULTS.modes)})")
    sweep.add_argument("--seq-lens", nargs="+", type=positive_int, help=f"default {_join(DEFAULTS.seq_lens)}")
    sweep.add_argument("--num-pairs", nargs="+", type=positive_int, help=f"key-value pairs (default "
                       f"{_join(DEFAULTS.num_pairs)}; settings with 4 * pairs > length are skipped)")  # fmt: skip
    sweep.add_argument("--lrs", nargs="+", type=positive_float, help=f"learning rates; each setting reports its best "
                       f"(default {_join(DEFAULTS.lrs)})")  # fmt: skip
    sweep.add_argument("--seeds", type=positive_int, help=f"default {DEFAULTS.seeds}")
    model = parser.add_argument_group("model and training")
    model.add_argument("--d-model", type=positive_int, help=f"hidden size (default {DEFAULTS.d_model})")
    model.add_argument("--num-heads", type=positive_int, help=f"default {DEFAULTS.num_heads}")
    model.add_argument("--vocab-size", type=positive_int, help=f"default {DEFAULTS.vocab_size}")
    model.add_argument("--steps", type=positive_int, help=f"optimiser steps per run (default {DEFAULTS.steps})")
    model.add_argument("--batch-size", type=positive_int, help=f"default {DEFAULTS.batch_size}")
    model.add_argument("--eval-examples", type=positive_int, help=f"default {DEFAULTS.eval_examples}")
    hardware = parser.add_argument_group("hardware and output")
    hardware.add_argument("--device", type=device_name, default="auto", help="auto (cuda if present), cpu, cuda:N")
    hardware.add_argument("--backend", choices=("auto", "torch", "triton", "fla", "recurrent"),
                          help=f"efla_attention backend (default {DEFAULTS.backend})")  # fmt: skip
    hardware.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    add_output_arguments(hardware, Path("runs/mqar"))
    hardware.add_argument("--merge", nargs="+", type=Path, metavar="DIR",
                          help="train nothing: merge the results.json of these sweep folders into --out")
    hardware.add_argument("--quiet", action="store_true", help="no per-run lines")


def _join(values: tuple) -> str:
    return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _describe(config: SweepConfig) -> str:
    return (f"lengths {_join(config.seq_lens)}, pairs {_join(config.num_pairs)}, d {config.d_model}, vocabulary "
            f"{config.vocab_size}, {config.steps} steps of batch {config.batch_size}, "
            f"lrs {_join(config.lrs)}")  # fmt: skip


def sweep_config(args: argparse.Namespace) -> SweepConfig:
    """The smoke (or --full) sweep with every given flag applied."""
    base = FULL if args.full else DEFAULTS
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SweepConfig) if getattr(args, f.name, None)
             is not None}  # fmt: skip
    given = {name: tuple(value) if name in _SWEPT else value for name, value in given.items()}
    return dataclasses.replace(base, **given)


def run(args: argparse.Namespace) -> dict:
    """Run the sweep from parsed arguments; writes the outputs to ``args.out`` and returns the results dictionary."""
    if args.merge:
        return _merge(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = sweep_config(args)
        if not config.tasks():
            raise ValueError("no setting has 4 * pairs <= sequence length; raise --seq-lens or lower --num-pairs")
        prepare_output_folder(args.out, OUTPUTS, args.overwrite)
    except ValueError as error:
        raise CommandError(str(error)) from error
    if not args.quiet:
        print(f"efla mqar: {len(config.tasks())} settings x {len(config.modes)} modes x {len(config.lrs)} lrs x "
              f"{config.seeds} seeds on {config.device}, {torch.get_num_threads()} threads")  # fmt: skip
    results = run_sweep(config, on_update=lambda partial: _save(partial, args.out), progress=not args.quiet)
    print(markdown_table(results))
    print(f"\nwrote {args.out / 'results.json'}, table.md, recall.png ({results['config']['timing']['total_s']:.0f} s)")
    _exit_unless_complete(results)
    return results


def _merge(args: argparse.Namespace) -> dict:
    """--merge: one results.json, table and plot from the sweeps in ``args.merge``."""
    given = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(SweepConfig)
             if f.name != "device" and getattr(args, f.name, None) is not None]  # fmt: skip
    parts = []
    try:
        if args.full or given:
            raise ValueError(f"--merge trains nothing; drop {' '.join(given) or '--full'}")
        if any(folder.resolve() == args.out.resolve() for folder in args.merge):
            raise ValueError(f"--out {args.out} is one of the --merge folders; write the merge to a new folder")
        for folder in args.merge:
            path = folder / "results.json"
            try:
                parts.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError) as error:
                raise ValueError(f"--merge {folder}: cannot read {path} ({error}); pass folders of efla mqar "
                                 "sweeps") from None  # fmt: skip
        results = merge_results(parts)
        prepare_output_folder(args.out, OUTPUTS, args.overwrite)
    except ValueError as error:
        raise CommandError(str(error)) from error
    _save(results, args.out)
    print(markdown_table(results))
    print(f"\nmerged {len(parts)} sweeps ({len(results['runs'])} runs) into {args.out / 'results.json'}, table.md, "
          "recall.png")  # fmt: skip
    _exit_unless_complete(results)
    return results


def _exit_unless_complete(results: dict) -> None:
    """Fail with exit code 1, after the outputs are written, if any run diverged or (when merging) is still to come."""
    if results["status"] == "running":
        raise CommandError("a merged sweep had not finished; the table holds the runs done so far", UNFINISHED)
    if results["status"] != "complete":
        diverged = sum(run["status"] == "diverged" for run in results["runs"])
        raise CommandError(f"{diverged} run(s) diverged (see table.md); the table holds the others", UNFINISHED)


def _save(results: dict, out: Path) -> None:
    write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "table.md", markdown_table(results) + "\n")
    plot_results(results, out / "recall.png")
