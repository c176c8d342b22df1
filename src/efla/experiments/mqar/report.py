"""Turn MQAR results.json dictionaries into a markdown table and a PNG plot, and merge sweeps run apart."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from efla.variants import DISPLAY_NAMES

_MERGED = ("modes", "seq_lens", "num_pairs", "lrs")  # config fields whose values the merged sweep takes the union of
_PER_PROCESS = ("torch_threads", "timing", "device")  # config fields that may differ between the merged sweeps


def _shaping(config: dict) -> dict:
    """The config fields that shape a run and must agree between merged sweeps."""
    return {k: v for k, v in config.items() if k not in (*_MERGED, *_PER_PROCESS, "merged_from")}


def merge_results(parts: list[dict]) -> dict:
    """One results dictionary from sweeps run apart (e.g. one process per mode, or per GPU): their runs together, the
    union of their modes, lengths, pairs and rates; a merged sweep merges again. Raises ValueError if the sweeps differ
    in anything else that shapes a run (steps, model size, vocabulary, seeds, ...) or if two of them ran the same
    (mode, setting, rate, seed)."""
    if not parts:
        raise ValueError("nothing to merge")
    fixed = _shaping(parts[0]["config"])
    config = {**fixed, **{name: [] for name in _MERGED}, "merged_from": []}
    runs, seen = [], set()
    for index, part in enumerate(parts):
        other = _shaping(part["config"])
        differing = sorted(k for k in fixed.keys() | other.keys() if fixed.get(k) != other.get(k))
        if differing:
            raise ValueError(f"sweep {index + 1} differs from the first in {', '.join(differing)}; only sweeps of "
                             "the same models and training can be merged")  # fmt: skip
        for name in _MERGED:
            config[name] += [v for v in part["config"][name] if v not in config[name]]
        # each process's own threads, timing and device
        config["merged_from"] += part["config"].get("merged_from") or [
            {k: part["config"].get(k) for k in _PER_PROCESS}]
        for run in part["runs"]:
            key = (run["mode"], run["seq_len"], run["num_pairs"], run["lr"], run["seed"])
            if key in seen:
                raise ValueError(f"two sweeps both ran {run['mode']} T={run['seq_len']} pairs={run['num_pairs']} "
                                 f"lr {run['lr']} seed {run['seed']}; merge sweeps of disjoint runs")  # fmt: skip
            seen.add(key)
            runs.append(run)
    for name in ("seq_lens", "num_pairs", "lrs"):
        config[name] = sorted(config[name], key=float)
    statuses = {part["status"] for part in parts}
    status = "running" if "running" in statuses else "incomplete" if "incomplete" in statuses else "complete"
    return {"status": status, "config": config, "runs": runs}


def best_accuracies(results: dict) -> dict[tuple[int, int, str], tuple[list[float], float | None]]:
    """Per (seq_len, num_pairs, mode): the per-seed recall at the best learning rate (highest mean over seeds, as
    Zoology reports), and that rate; an empty list (and None) where every run diverged or none finished yet."""
    by_lr: dict[tuple[int, int, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in results["runs"]:
        key = (run["seq_len"], run["num_pairs"], run["mode"])
        by_lr[key]  # a setting whose runs all diverged still gets a row
        if run["status"] == "finished":
            by_lr[key][run["lr"]].append(run["accuracy"])
    best = {}
    for key, rates in by_lr.items():
        if rates:
            lr = max(rates, key=lambda rate: np.mean(rates[rate]))
            best[key] = (rates[lr], lr)
        else:
            best[key] = ([], None)
    return best


def _diverged(results: dict, seq_len: int, num_pairs: int, mode: str) -> list[str]:
    wanted = (seq_len, num_pairs, mode, "diverged")
    return [f"lr {r['lr']:g} seed {r['seed']} diverged at step {r['step']}" for r in results["runs"]
            if (r["seq_len"], r["num_pairs"], r["mode"], r["status"]) == wanted]  # fmt: skip


def markdown_table(results: dict) -> str:
    """Recall accuracy (% of answers exactly right) per setting and mode: mean ± std over seeds at the best rate."""
    modes = results["config"]["modes"]
    best = best_accuracies(results)
    lines = ["Recall accuracy in % on held-out examples (answer positions only), mean ± std over seeds at each "
             "setting's best learning rate.", "",
             "| seq len | pairs | " + " | ".join(DISPLAY_NAMES.get(m, m) for m in modes) + " |",
             "|---|---|" + "---|" * len(modes)]  # fmt: skip
    for seq_len, num_pairs in sorted({(T, P) for T, P, _ in best}):
        cells = []
        for mode in modes:
            accuracies, lr = best.get((seq_len, num_pairs, mode), ([], None))
            cell = f"{np.mean(accuracies):.1f} ± {np.std(accuracies):.1f} (lr {lr:g})" if accuracies else "–"
            cells.append("; ".join([cell, *_diverged(results, seq_len, num_pairs, mode)]))
        lines.append(f"| {seq_len} | {num_pairs} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(results: dict, path: Path) -> Path:
    """Recall accuracy against sequence length, one panel per number of pairs: each seed as a dot (the outcomes are
    often all or nothing, which a mean and a standard deviation hide), the mean over seeds as a line, one colour per
    mode, the modes drawn side by side at each length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_accuracies(results)
    modes = results["config"]["modes"]
    pairs = sorted({P for _, P, _ in best}) or [0]
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.6 * len(pairs), 3.4), dpi=100, squeeze=False)
    for ax, num_pairs in zip(axes[0], pairs, strict=True):
        for index, mode in enumerate(modes):
            points = sorted((T, acc) for (T, P, m), (acc, _) in best.items() if num_pairs == P and mode == m and acc)
            if not points:
                continue
            shift = 2 ** (0.07 * (index - (len(modes) - 1) / 2))  # side by side on the log axis
            lengths = np.array([T for T, _ in points]) * shift
            line = ax.plot(lengths, [np.mean(acc) for _, acc in points], lw=1, alpha=0.6,
                           label=DISPLAY_NAMES.get(mode, mode))[0]  # fmt: skip
            dots = [(x, a) for x, (_, acc) in zip(lengths, points, strict=True) for a in acc]
            ax.scatter(*zip(*dots, strict=True), s=12, color=line.get_color(), zorder=3)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="sequence length", ylabel="recall accuracy (%)", ylim=(-3, 103),
               title=f"{num_pairs} key-value pairs")  # fmt: skip
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(modes), fontsize=8)
    fig.suptitle("MQAR: 2-layer models, best learning rate per setting (dots: seeds; lines: means)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path
