"""Write the documents' result tables from the result files.

    python benchmarks/report.py            # rewrite every table between its markers
    python benchmarks/report.py --check    # exit 1, naming each table, when a document is out of date

A generated table sits in README.md, BENCHMARKS.md, EXPERIMENTS.md or docs/*.md between the lines
``<!-- table: NAME -->`` and ``<!-- end table -->``; NAME is one of ``TABLES``. The benchmark tables come from
``benchmarks/results/*.jsonl`` (one dated file per run, rows written by ``benchmarks/results_io.py``): a table takes
the newest file that holds its rows; a table compared against fla takes each shape from the newest run that timed it
beside fla's row, and names every run it used. The study tables read the JSON results under ``docs/`` that
``efla compare-lm`` and ``efla mqar`` wrote.

To publish a benchmark run: add its result file to ``benchmarks/results/``, run this script, commit both.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from results_io import read_rows

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "BENCHMARKS.md", "EXPERIMENTS.md", "docs/*.md")
BLOCK = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end table -->)", re.S)
FILE_NAME = re.compile(r"^(?P<date>\d{4}-\d{2}-\d{2})_.+?(?:_(?P<run>\d+))?$")
SOLVED = 90.0  # MQAR: a run above this recall (%) has learned the task


@dataclass(frozen=True)
class Run:
    """The rows of one result file (one benchmark run)."""

    path: Path
    rows: list[dict]

    @property
    def order(self) -> tuple[str, int, str]:
        """Chronological sort key: the file name's date, then its run number on that day."""
        match = FILE_NAME.match(self.path.stem)
        if match is None:
            raise ValueError(f"{self.path.name}: result files are named DATE_DEVICE_BENCHMARK[_N].jsonl")
        return match["date"], int(match["run"] or 1), self.path.name

    def select(self, match: Callable[[dict], bool]) -> Run:
        return Run(self.path, [row for row in self.rows if match(row)])


class Results:
    """Every result file under ``directory``, oldest first."""

    def __init__(self, directory: Path) -> None:
        self.runs = sorted((Run(path, read_rows(path)) for path in directory.glob("*.jsonl")), key=lambda r: r.order)

    def newest(self, match: Callable[[dict], bool]) -> Run | None:
        """The newest run holding rows that ``match``, with those rows only."""
        for run in reversed(self.runs):
            chosen = run.select(match)
            if chosen.rows:
                return chosen
        return None

    def per_group(self, match: Callable[[dict], bool], group: Callable[[dict], object],
                  anchor: Callable[[dict], bool]) -> list[tuple[object, Run]]:
        """Each group (in order of first appearance, oldest run first) from the newest run holding that group's
        ``anchor`` row (the baseline it is compared against), with that run's rows of the group."""
        keys = list(dict.fromkeys(group(row) for run in self.runs for row in run.rows if match(row) and anchor(row)))
        chosen = []
        for key in keys:
            for run in reversed(self.runs):
                rows = [row for row in run.rows if match(row) and group(row) == key]
                if any(anchor(row) for row in rows):
                    chosen.append((key, Run(run.path, rows)))
                    break
        return chosen


# ---------------------------------------------------------------------------------------------------- formatting


def table(head: Iterable[str], rows: Iterable[Iterable[object]]) -> list[str]:
    """A markdown table; None cells stay empty."""
    head = list(head)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join("" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return lines


def num(value: float | None, digits: int = 2) -> str | None:
    return None if value is None else f"{value:.{digits}f}"


def kilo(value: float | None) -> str | None:
    return None if value is None else f"{value / 1e3:.1f}k"


def plain(value: float | None) -> str | None:
    return None if value is None else f"{value:g}"


def sci(value: float | None) -> str | None:
    return None if value is None else f"{value:.2e}"


def span(values: Iterable[float | None], digits: int = 2, unit: str = "") -> str:
    """"lo-hi" (or one value) of the values that are not None."""
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    lo, hi = f"{min(present):.{digits}f}", f"{max(present):.{digits}f}"
    return (lo if lo == hi else f"{lo}-{hi}") + unit


def ratio(row: dict | None, base: dict | None, field: str) -> float | None:
    """row[field] / base[field], or the ratio the row reports itself (``FIELD_vs_baseline``) when it has no value."""
    if row is None:
        return None
    if base is not None and row.get(field) is not None and base.get(field):
        return row[field] / base[field]
    stem = field.removesuffix("_ms").removesuffix("_mib").removesuffix("_gib")
    return row.get(f"{stem}_vs_baseline")


def link(path: Path, doc_dir: Path) -> str:
    """A markdown link to ``path`` from a document in ``doc_dir``, named by its path in the repository."""
    name = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    return f"[{name}]({Path(os.path.relpath(path, doc_dir)).as_posix()})"


def device_label(device: str | None) -> str:
    return "CPU" if device == "cpu" else device or "?"


def describe(run: Run, doc_dir: Path) -> str:
    """Where and how a run was measured, from its rows' common fields, with a link to its file."""
    first = run.rows[0]
    versions = ", ".join(f"{name} {version}" for name, version in (first.get("versions") or {}).items())
    parts = [device_label(first.get("device")), first.get("cpu"), first["date"], versions,
             f"tree {first['commit']}" if first.get("commit") else None]
    text = ", ".join(p for p in parts if p)
    commands = list(dict.fromkeys(row["command"] for row in run.rows if row.get("command")))
    if commands:
        text += ": " + "; ".join(f"`{c}`" for c in commands)
    notes = {row.get("note") for row in run.rows}
    if len(notes) == 1 and None not in notes:
        text += f" ({notes.pop()})"
    return f"{text} ({link(run.path, doc_dir)})"


def sources(runs: list[Run], doc_dir: Path) -> list[str]:
    """The lines under a table naming the runs it came from (numbered when there are several)."""
    unique = list({run.path: run for run in runs}.values())
    if len(unique) == 1:
        return ["", f"Measured: {describe(unique[0], doc_dir)}."]
    return ["", "Measured:", ""] + [f"{i}. {describe(run, doc_dir)}." for i, run in enumerate(unique, 1)]


def run_numbers(runs: list[Run]) -> dict[Path, int]:
    return {path: i for i, path in enumerate(dict.fromkeys(run.path for run in runs), 1)}


def row_notes(runs: list[Run]) -> list[str]:
    """Notes that single rows carry (a note every row of a run shares is said in the run's description)."""
    notes = []
    for run in runs:
        shared = {row.get("note") for row in run.rows}
        if len(shared) > 1:
            notes += [f"{row.get('variant') or row.get('model') or row.get('impl')}: {row['note']}"
                      for row in run.rows if row.get("note")]
    return ["", *(f"Note: {note}." for note in dict.fromkeys(notes))] if notes else []


# ---------------------------------------------------------------------------------------------------- benchmarks


def kernels(results: Results, doc_dir: Path, gated: bool) -> list[str]:
    base_name, ours_name, delta_name = (("fla Gated DeltaNet", "ours gated efla", "ours gated delta") if gated
                                        else ("fla DeltaNet", "ours efla", "ours delta"))
    groups = results.per_group(
        lambda r: r["benchmark"] == "kernels" and r.get("gated") == gated and "kind" not in r,
        lambda r: r["shape"], lambda r: r["impl"] == base_name)
    runs = [run for _, run in groups]
    numbers = run_numbers(runs)
    rows = []
    for shape, run in groups:
        by_impl = {row["impl"]: row for row in run.rows}
        base, ours, delta = by_impl.get(base_name), by_impl.get(ours_name), by_impl.get(delta_name)
        delta_cell = None
        if delta is not None:
            delta_cell = f"{num(ratio(delta, base, 'fwd_ms'))} / {num(ratio(delta, base, 'fwd_bwd_ms'))}"
        rows.append([shape, num(base["fwd_ms"], 3), num(ours and ours.get("fwd_ms"), 3),
                     num(ratio(ours, base, "fwd_ms")), num(base["fwd_bwd_ms"], 3),
                     num(ours and ours.get("fwd_bwd_ms"), 3), num(ratio(ours, base, "fwd_bwd_ms")),
                     num(ratio(ours, base, "peak_mib")), delta_cell]
                    + ([numbers[run.path]] if len(numbers) > 1 else []))
    mode = "Gated DeltaNet" if gated else "delta mode"
    head = ["B x T x H x D", "fla fwd ms", "ours fwd ms", "fwd x", "fla f+b ms", "ours f+b ms", "f+b x", "mem x",
            f"our {mode} fwd x / f+b x"] + (["run"] if len(numbers) > 1 else [])
    return table(head, rows) + sources(runs, doc_dir)


def kernel_profile(results: Results, doc_dir: Path) -> list[str]:
    run = results.newest(lambda r: r["benchmark"] == "kernels" and r.get("kind") == "profile" and not r.get("gated"))
    impls = list(dict.fromkeys(row["impl"] for row in run.rows))
    stages = list(dict.fromkeys(row["stage"] for row in run.rows))
    us = {(row["stage"], row["impl"]): row["us"] for row in run.rows}
    rows = [[stage, *(us.get((stage, impl)) for impl in impls)] for stage in stages]
    shape = run.rows[0]["shape"]
    return (table([f"kernel (us per forward+backward at {shape})", *impls], rows) + sources([run], doc_dir))


def _model_rows(gated: bool) -> Callable[[dict], bool]:
    return lambda r: (r["benchmark"] == "model_throughput" and r.get("preset") == "340M" and r["precision"] == "bf16"
                      and bool(r.get("decay_gate")) == gated and r.get("activation_checkpointing") in (None, "none")
                      and not r.get("packed_docs") and not r.get("oom"))


def model_throughput(results: Results, doc_dir: Path, gated: bool) -> list[str]:
    groups = results.per_group(_model_rows(gated), lambda r: (r["batch"], r["length"]), lambda r: r["variant"] == "fla")
    runs = [run for _, run in groups]
    numbers = run_numbers(runs)
    rows = []
    for (batch, length), run in groups:
        by_variant = {row["variant"]: row for row in run.rows}
        ours, base = by_variant.get("efla", {}), by_variant["fla"]
        rows.append([f"{batch} x {length}", kilo(ours.get("tokens_per_s")), num(ours.get("peak_gib"), 1),
                     kilo(base["tokens_per_s"]), num(base.get("peak_gib"), 1), num(ratio(ours, base, "tokens_per_s")),
                     num(ratio(ours, base, "peak_gib"))] + ([numbers[run.path]] if len(numbers) > 1 else []))
    ours_name, base_name = ("gated EFLA", "fla Gated DeltaNet") if gated else ("EFLA", "fla DeltaNet")
    head = ["B x T", f"{ours_name} tokens/s", f"{ours_name} GiB", f"{base_name} tokens/s", f"{base_name} GiB",
            "speed vs fla", "memory vs fla"] + (["run"] if len(numbers) > 1 else [])
    return table(head, rows) + sources(runs, doc_dir) + row_notes(runs)


def context_sweep(results: Results, doc_dir: Path) -> list[str]:
    run = results.newest(lambda r: r["benchmark"] == "model_throughput" and r.get("batch") == 1
                         and r.get("activation_checkpointing") == "full")
    rows = [[f"{row['length']:,}", num(row.get("ms"), 1), kilo(row["tokens_per_s"]), num(row["peak_gib"], 1)]
            for row in run.rows]
    return table(["tokens at batch 1", "step ms", "tokens/s", "peak GiB"], rows) + sources([run], doc_dir)


def loss(results: Results, doc_dir: Path) -> list[str]:
    run = results.newest(lambda r: r["benchmark"] == "loss")
    rows = []
    for row in run.rows:
        errors = row.get("rel_err") or [None] * 3
        rows.append([row["tokens"], row["impl"], num(row["ms"]), f"{row['peak_mib']:.0f}", *map(sci_short, errors)])
    head = ["tokens", "implementation", "loss+backward ms", "peak MiB", "rel err loss", "grad h", "grad W"]
    return table(head, rows) + sources([run], doc_dir)


def sci_short(value: float | None) -> str | None:
    return None if value is None else f"{value:.1e}"


def generation(results: Results, doc_dir: Path) -> list[str]:
    run = results.newest(lambda r: r["benchmark"] == "generation" and r.get("preset") == "340M")

    def label(row: dict) -> str:
        return row["model"] + (f" (run {row['run']})" if row.get("run", 1) != 1 else "")

    labels = list(dict.fromkeys(label(row) for row in run.rows))
    cells = {(row["batch"], row["prompt"], label(row)): row for row in run.rows}
    shapes = list(dict.fromkeys((row["batch"], row["prompt"]) for row in run.rows))
    rows = []
    for batch, prompt in shapes:
        row = [batch, f"{prompt:,}"]
        for name in labels:
            cell = cells.get((batch, prompt, name))
            row.append(None if cell is None else f"{cell['ms_per_token']:.2f} ({cell['tokens_per_s']:,.0f})")
        rows.append(row)
    lines = [*table(["batch", "prompt", *labels], rows), "", "ms per generated token (tokens/s)."]
    if any("call_ms" in row for row in run.rows):
        calls = []
        for batch, prompt in shapes:
            row = [batch, f"{prompt:,}"]
            for name in labels:
                cell = cells.get((batch, prompt, name))
                row.append(None if cell is None else f"{cell['call_ms']:.0f} / {cell['bar_ms']:.0f} "
                           f"({cell['first_call_ms']:.0f})")
            calls.append(row)
        new = run.rows[0]["new_tokens"]
        lines += ["", *table(["batch", "prompt", *labels], calls), "",
                  f"Whole generate calls of {new} new tokens: ms of a call / the bar, prefill + {new} x 1.5 ms "
                  "(ms of the first call at that shape)."]
    return [*lines, *sources([run], doc_dir), *row_notes([run])]


def host_overhead(results: Results, doc_dir: Path) -> list[str]:
    run = results.newest(lambda r: r["benchmark"] == "host_overhead")
    with_gpu = any(row.get("gpu_us") is not None for row in run.rows)
    rows = [[row["operator"], plain(round(row["host_us"], 1))]
            + ([plain(round(row["gpu_us"], 1)) if row.get("gpu_us") is not None else None] if with_gpu else [])
            for row in run.rows]
    return (table(["operator", "host us per call"] + (["GPU us per call"] if with_gpu else []), rows)
            + sources([run], doc_dir))


def host_overhead_cpu(results: Results, doc_dir: Path) -> list[str]:
    run = results.newest(lambda r: r["benchmark"] == "host_overhead_cpu")
    rows = [[row["call"], num(row["host_us"], 1)] for row in run.rows]
    return table(["call (kernels stubbed)", "host us per call"], rows) + sources([run], doc_dir)


def cpu_backends(results: Results, doc_dir: Path) -> list[str]:
    run = results.newest(lambda r: r["benchmark"] == "cpu_backends")
    timed = [row for row in run.rows if "seconds" in row]
    reference = next(row["seconds"] for row in timed if row["backend"] == "recurrent")
    rows = [[row["backend"] + (f" (chunk_size {row['chunk_size']})" if row.get("chunk_size") else ""),
             num(row["seconds"], 3), f"{reference / row['seconds']:.1f}x"] for row in timed]
    checks = [f"Argument checks: {row['us_per_call']} us per call." for row in run.rows if row.get("kind") == "checks"]
    shape = run.rows[0].get("shape")
    return (table([f"backend, forward+backward at {shape}" if shape else "backend", "seconds",
                   "speed-up vs recurrent"], rows) + (["", *checks] if checks else []) + sources([run], doc_dir))


def trainer(results: Results, doc_dir: Path) -> list[str]:
    run = results.newest(lambda r: r["benchmark"] == "trainer" and r.get("gpus") == 1 and "window_tokens_per_s" in r)
    rows = [[row["data"], row["micro_batch"], kilo(row["tokens_per_s"]),
             ", ".join(kilo(x) for x in row["window_tokens_per_s"]), num(row.get("peak_gib"), 1)] for row in run.rows]
    steps = run.rows[0].get("steps", "")
    head = ["data", "B x T", f"tokens/s (steps {steps})", "10-step windows", "peak GiB"]
    return table(head, rows) + sources([run], doc_dir)


def scaling(results: Results, doc_dir: Path) -> list[str]:
    run = None
    for candidate in reversed(results.runs):
        if any(row.get("benchmark") == "trainer" and row.get("gpus", 1) > 1 for row in candidate.rows):
            run = candidate
            break
    single = next(row["tokens_per_s"] for row in run.rows if row["gpus"] == 1)
    rows = [[row["gpus"], row["strategy"], f"{row['tokens_per_s']:,.0f}", f"{row['tokens_per_s'] / row['gpus']:,.0f}",
             f"{row['tokens_per_s'] / row['gpus'] / single:.3f}"] for row in run.rows]
    return (table(["GPUs", "strategy", "tokens/s", "per GPU", "weak-scaling efficiency"], rows)
            + sources([run], doc_dir))


KERNEL_ORDER = ("wy_fwd", "state_fwd", "out", "state_bwd", "grad_qk", "grad_wy")


def tuning(results: Results, doc_dir: Path) -> list[str]:
    groups = results.per_group(lambda r: r["benchmark"] == "tune_kernels",
                               lambda r: (r["gated"], r["shape"], r["kernel"]), lambda r: True)

    def head_dim(shape: str) -> int:
        return int(shape.split("x")[-1])

    groups.sort(key=lambda g: (g[0][0], head_dim(g[0][1]), g[0][1], KERNEL_ORDER.index(g[0][2])))
    runs = [run for _, run in groups]
    numbers = run_numbers(runs)
    rows = []
    for (gated, shape, kernel), run in groups:
        row = run.rows[-1]
        default = None if row["default"] is None else ", ".join(map(str, row["default"]))
        rows.append([kernel, "gated" if gated else "ungated", shape, default, plain(row["default_us"]),
                     ", ".join(map(str, row["best"])), plain(row["best_us"]), numbers[run.path]])
    head = ["kernel", "form", "B x T x H x D", "old default (V-block, warps, stages)", "us", "chosen", "us", "run"]
    return table(head, rows) + sources(runs, doc_dir)


# ---------------------------------------------------------------------------------------------------- studies


def exactness(results: Results, doc_dir: Path, gated: bool) -> list[str]:
    run = results.newest(lambda r: r["benchmark"] == "exactness")
    steps = [row for row in run.rows if row.get("kind") == "one_step" and (row["neg_g"] > 0) == gated]
    if gated:
        head = ["β‖k‖²", "−g", "Euler", "RK2", "RK4", "Gated DeltaNet", "gated EFLA"]
        rows = [[row["beta_lam"], row["neg_g"], *(sci(row[m]) for m in ("euler", "rk2", "rk4", "gated_delta", "efla"))]
                for row in steps]
    else:
        head = ["β‖k‖²", "Euler", "RK2", "RK4", "EFLA"]
        rows = [[row["beta_lam"], *(sci(row[m]) for m in ("euler", "rk2", "rk4", "efla"))] for row in steps]
        for order in (row for row in run.rows if row.get("kind") == "order"):
            rows.append(["fitted order", *(order[m] if order[m] is not None else "exact"
                                           for m in ("euler", "rk2", "rk4", "efla"))])
    return table(head, rows) + sources([run], doc_dir)


def smnist(results: Results, doc_dir: Path) -> list[str]:
    groups = results.per_group(lambda r: r["benchmark"] == "smnist", lambda r: (r["steps"], r["seeds"], r["method"]),
                               lambda r: True)
    runs = [run for _, run in groups]
    rows = []
    for (steps, seeds, method), run in groups:
        row = run.rows[-1]
        cells = [f"{row[key][0]:.1f} ± {row[key][1]:.1f}" for key in ("clean", "auc_intensity", "auc_noise",
                                                                        "auc_dropout")]
        rows.append([f"{steps} steps, {seeds} seeds", f"{'EFLA' if method == 'efla' else 'DeltaNet'} ({row['lr']:g})",
                     *cells])
    head = ["training", "method (lr)", "clean %", "AUC intensity", "AUC Gaussian noise", "AUC pixel dropout"]
    return table(head, rows) + sources(runs, doc_dir)


MODES = {"efla": "EFLA", "delta": "DeltaNet", "gated-efla": "gated EFLA", "gated-delta": "Gated DeltaNet"}


def mqar(doc_dir: Path, path: Path) -> list[str]:
    data = json.loads(path.read_text())
    modes = data["config"]["modes"]
    settings = list(dict.fromkeys((run["seq_len"], run["num_pairs"]) for run in data["runs"]))
    settings.sort()
    recall = {}
    for run in data["runs"]:
        recall.setdefault((run["seq_len"], run["num_pairs"], run["mode"]), []).append((run["seed"], run["accuracy"]))
    rows = []
    for seq_len, pairs in settings:
        cells = [", ".join(f"{acc:.1f}" for _, acc in sorted(recall.get((seq_len, pairs, mode), []))) for mode in modes]
        rows.append([f"{seq_len:,}", pairs, *cells])
    solved = [f"{sum(acc > SOLVED for r in recall if r[2] == mode for _, acc in recall[r])} of "
              f"{sum(len(recall[r]) for r in recall if r[2] == mode)}" for mode in modes]
    rows.append([f"runs above {SOLVED:.0f} %", "", *solved])
    return [*table(["seq len", "pairs", *(MODES.get(m, m) for m in modes)], rows), "",
            f"Recall in %, per seed. From {link(path, doc_dir)}."]


def _summary_of(path: Path) -> dict:
    return {entry["mode"]: entry for entry in json.loads(path.read_text())["summary"]}


def lm(doc_dir: Path, path: Path) -> list[str]:
    """Per mode: validation and test perplexity and test bits per byte (mean ± std over seeds) and each seed's."""
    data = json.loads(path.read_text())
    rows = []
    for entry in data["summary"]:
        seeds = len(entry["seeds"])

        def stat(key: str, digits: int, entry: dict = entry, seeds: int = seeds) -> str:
            value = entry[key]
            return f"{value['mean']:.{digits}f}" + (f" ± {value['std']:.{digits}f}" if seeds > 1 else "")

        per_seed = ", ".join(f"{v:.2f}" for v in entry["test_ppl"]["values"]) if seeds > 1 else None
        rows.append([MODES.get(entry["mode"], entry["mode"]), f"{entry['lr']:g}", stat("validation_ppl", 2),
                     stat("test_ppl", 2), stat("test_bits_per_byte", 4)] + ([per_seed] if seeds > 1 else []))
    many = any(len(entry["seeds"]) > 1 for entry in data["summary"])
    head = ["mode", "lr", "validation ppl", "test ppl", "test bits/byte"] + (["test ppl per seed"] if many else [])
    return [*table(head, rows), "", f"From {link(path, doc_dir)}."]


def lm_learning_rates(doc_dir: Path, paths: list[Path]) -> list[str]:
    """Test (validation) perplexity of seed 0 per mode and learning rate, over several sweeps."""
    cells, lrs, modes = {}, set(), []
    for path in paths:
        for run in json.loads(path.read_text())["runs"]:
            if run["seed"] != 0 or run["mode"] not in ("efla", "delta"):
                continue
            cells[run["mode"], run["lr"]] = f"{run['test']['perplexity']:.2f} ({run['validation']['perplexity']:.2f})"
            lrs.add(run["lr"])
            modes.append(run["mode"])
    order = sorted(lrs)
    rows = [[MODES[mode], *(cells.get((mode, lr)) for lr in order)] for mode in dict.fromkeys(modes)]
    files = ", ".join(link(p, doc_dir) for p in paths)
    return [*table(["mode", *(f"lr {lr:g}" for lr in order)], rows), "",
            f"Test perplexity (validation), seed 0. From {files}."]


# ---------------------------------------------------------------------------------------------------- README


def summary(results: Results, doc_dir: Path) -> list[str]:
    """The README's one table: a line per headline result, its numbers computed from the same files."""
    rows = []

    def kernel_line(gated: bool, what: str, anchor: str) -> None:
        base_name, ours_name = ("fla Gated DeltaNet", "ours gated efla") if gated else ("fla DeltaNet", "ours efla")
        groups = results.per_group(
            lambda r: r["benchmark"] == "kernels" and r.get("gated") == gated and "kind" not in r,
            lambda r: r["shape"], lambda r: r["impl"] == base_name)
        pairs = [({r["impl"]: r for r in run.rows}.get(ours_name), {r["impl"]: r for r in run.rows}[base_name])
                 for _, run in groups]
        where = _where([run for _, run in groups], f"bf16, {len(groups)} shapes")
        rows.append([what, f"forward {span(ratio(o, b, 'fwd_ms') for o, b in pairs)}x, forward+backward "
                     f"{span(ratio(o, b, 'fwd_bwd_ms') for o, b in pairs)}x fla's time; memory "
                     f"{span(ratio(o, b, 'peak_mib') for o, b in pairs)}x", where, f"[BENCHMARKS.md]({anchor})"])

    kernel_line(False, "Kernels: EFLA vs fla's DeltaNet kernel", "BENCHMARKS.md#kernels")
    kernel_line(True, "Kernels: gated EFLA vs fla's Gated DeltaNet kernel", "BENCHMARKS.md#gated-kernels")
    groups = results.per_group(_model_rows(False), lambda r: (r["batch"], r["length"]), lambda r: r["variant"] == "fla")
    pairs = [({r["variant"]: r for r in run.rows}.get("efla", {}), {r["variant"]: r for r in run.rows}["fla"])
             for _, run in groups]
    rows.append(["340M model, forward+backward: EFLA vs fla's DeltaNet model",
                 f"{span(ratio(o, b, 'tokens_per_s') for o, b in pairs)}x the tokens/s at "
                 f"{span(ratio(o, b, 'peak_gib') for o, b in pairs)}x the memory",
                 _where([run for _, run in groups], f"bf16, {len(groups)} shapes"),
                 "[BENCHMARKS.md](BENCHMARKS.md#model-training-throughput)"])
    run = results.newest(lambda r: r["benchmark"] == "generation" and r.get("model") == "efla graph")
    one = [r["ms_per_token"] for r in run.rows if r["batch"] == 1]
    top = max(r["batch"] for r in run.rows)
    many = [r["tokens_per_s"] for r in run.rows if r["batch"] == top]
    rows.append(["340M generation, CUDA-graph decode", f"{span(one)} ms per token at batch 1, "
                 f"{span((x / 1e3 for x in many), 1)}k tokens/s at batch {top}", _where([run], "bf16"),
                 "[BENCHMARKS.md](BENCHMARKS.md#generation)"])
    run = results.newest(lambda r: r["benchmark"] == "trainer" and r.get("gpus") == 1 and "window_tokens_per_s" in r)
    row = run.rows[-1]
    rows.append(["`efla train` defaults (340M, 8 x 2048, compiled)", f"{kilo(row['tokens_per_s'])} tokens/s, "
                 f"{row['peak_gib']} GiB", _where([run], "one GPU"), "[BENCHMARKS.md](BENCHMARKS.md#trainer)"])
    run = results.newest(lambda r: r["benchmark"] == "exactness" and r.get("kind") == "one_step")
    ungated = [r for r in run.rows if r["neg_g"] == 0]
    euler_at_1 = next(r["euler"] for r in ungated if r["beta_lam"] == 1)
    rows.append(["Exactness: one step against the matrix exponential", f"EFLA ≤ {max(r['efla'] for r in run.rows):.1e} "
                 f"relative error at every stiffness (gated too); Euler (DeltaNet's step) {euler_at_1:.2g} at "
                 "β‖k‖² = 1", _where([run], "float64"), "[EXPERIMENTS.md](EXPERIMENTS.md#exactness)"])
    groups = results.per_group(lambda r: r["benchmark"] == "smnist", lambda r: (r["steps"], r["seeds"]),
                               lambda r: True)
    (steps, seeds), run = max(groups, key=lambda g: g[0][1])
    by = {r["method"]: r for r in run.rows}
    rows.append([f"Sequential MNIST, {steps} steps, {seeds} seeds: EFLA vs DeltaNet",
                 f"clean {by['efla']['clean'][0]} vs {by['delta']['clean'][0]} %; area under the curve: intensity "
                 f"{by['efla']['auc_intensity'][0]} vs {by['delta']['auc_intensity'][0]}, noise "
                 f"{by['efla']['auc_noise'][0]} vs {by['delta']['auc_noise'][0]}, dropout "
                 f"{by['efla']['auc_dropout'][0]} vs {by['delta']['auc_dropout'][0]}",
                 _where([run], "5k digits"), "[EXPERIMENTS.md](EXPERIMENTS.md#sequential-mnist)"])
    data = json.loads((ROOT / "docs/mqar/results_gpu_4modes.json").read_text())
    solved = {mode: (sum(r["accuracy"] > SOLVED for r in data["runs"] if r["mode"] == mode),
                     sum(r["mode"] == mode for r in data["runs"])) for mode in data["config"]["modes"]}
    config = data["config"]
    rows.append(["MQAR: runs that learned recall", ", ".join(f"{MODES[m]} {s} of {n}" for m, (s, n) in solved.items()),
                 f"d = {config['d_model']}, lengths {min(config['seq_lens'])}-{max(config['seq_lens'])}",
                 "[EXPERIMENTS.md](EXPERIMENTS.md#associative-recall-mqar)"])
    for path, what in ((ROOT / "docs/compare_lm/results_seeds.json", "Language model, 60M, 10M tokens"),
                       (ROOT / "docs/compare_lm/lm340/results.json", "Language model, 340M, 50M tokens")):
        data = json.loads(path.read_text())
        seeds = len(json.loads(data["settings"]["seeds"]))
        cells = []
        for entry in data["summary"]:
            test = entry["test_ppl"]
            cells.append(f"{MODES[entry['mode']]} {test['mean']:.1f}" + (f" ± {test['std']:.1f}" if seeds > 1 else ""))
        rows.append([f"{what}: test perplexity", ", ".join(cells), f"{seeds} seed{'s' * (seeds > 1)}",
                     "[EXPERIMENTS.md](EXPERIMENTS.md#language-modelling)"])
    return table(["result", "measured", "setting", "details"], rows)


def _where(runs: list[Run], setting: str) -> str:
    devices = sorted({device_label(run.rows[0].get("device")) for run in runs})
    dates = sorted({run.rows[0]["date"] for run in runs})
    return f"{', '.join(devices)}, {setting}, {dates[0]}" + (f" to {dates[-1]}" if len(dates) > 1 else "")


# ---------------------------------------------------------------------------------------------------- documents


def _docs(name: str) -> Path:
    return ROOT / "docs" / name


TABLES: dict[str, Callable[[Results, Path], list[str]]] = {
    "summary": summary,
    "kernels": lambda r, d: kernels(r, d, gated=False),
    "kernels-gated": lambda r, d: kernels(r, d, gated=True),
    "kernel-profile": kernel_profile,
    "model-throughput": lambda r, d: model_throughput(r, d, gated=False),
    "model-throughput-gated": lambda r, d: model_throughput(r, d, gated=True),
    "context-sweep": context_sweep,
    "loss": loss,
    "generation": generation,
    "host-overhead": host_overhead,
    "host-overhead-cpu": host_overhead_cpu,
    "cpu-backends": cpu_backends,
    "trainer": trainer,
    "scaling": scaling,
    "launch-tuning": tuning,
    "exactness": lambda r, d: exactness(r, d, gated=False),
    "exactness-gated": lambda r, d: exactness(r, d, gated=True),
    "smnist": smnist,
    "mqar": lambda r, d: mqar(d, _docs("mqar/results_gpu_4modes.json")),
    "lm-seeds": lambda r, d: lm(d, _docs("compare_lm/results_seeds.json")),
    "lm-learning-rates": lambda r, d: lm_learning_rates(d, [_docs("compare_lm/results_seeds.json"),
                                                            _docs("compare_lm/results_lr_check.json")]),
    "lm-cpu": lambda r, d: lm(d, _docs("compare_lm/results_cpu_tiny.json")),
    "lm-340m": lambda r, d: lm(d, _docs("compare_lm/lm340/results.json")),
}


def render(text: str, results: Results, doc_dir: Path, where: str = "document") -> tuple[str, list[str]]:
    """``text`` with every marked table written afresh, and the names of the tables that changed."""
    changed = []

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise SystemExit(f"{where}: unknown table {name!r} (known: {', '.join(TABLES)})")
        body = "\n" + "\n".join(TABLES[name](results, doc_dir)) + "\n\n"  # blank lines: a block of its own
        if body != match["body"]:
            changed.append(name)
        return match[1] + body + match[4]

    return BLOCK.sub(replace, text), changed


def documents(root: Path) -> list[Path]:
    return [path for pattern in DOCUMENTS for path in sorted(root.glob(pattern))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is out of date")
    args = parser.parse_args(argv)
    results = Results(ROOT / "benchmarks" / "results")
    stale = []
    for path in documents(ROOT):
        text = path.read_text()
        new, changed = render(text, results, path.parent, str(path.relative_to(ROOT)))
        stale += [f"{path.relative_to(ROOT)}: {name}" for name in changed]
        if changed and not args.check:
            path.write_text(new)
    if args.check and stale:
        print("out of date (run python benchmarks/report.py):\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1
    if not args.check:
        print(f"{len(stale)} table(s) rewritten" + (": " + ", ".join(stale) if stale else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
