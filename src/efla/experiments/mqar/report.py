"""Turn an MQAR results.json dictionary into a markdown table and a PNG plot."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from efla.variants import DISPLAY_NAMES


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
    """Recall accuracy against sequence length, one panel per number of pairs, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_accuracies(results)
    pairs = sorted({P for _, P, _ in best}) or [0]
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.6 * len(pairs), 3.2), dpi=100, squeeze=False)
    for ax, num_pairs in zip(axes[0], pairs, strict=True):
        for mode in results["config"]["modes"]:
            points = sorted((T, np.mean(acc), np.std(acc)) for (T, P, m), (acc, _) in best.items()
                            if num_pairs == P and mode == m and acc)  # fmt: skip
            if points:
                lengths, mean, std = (np.array(column) for column in zip(*points, strict=True))
                ax.errorbar(lengths, mean, yerr=std, marker="o", markersize=3, capsize=2,
                            label=DISPLAY_NAMES.get(mode, mode))
        ax.set_xscale("log", base=2)
        ax.set(xlabel="sequence length", ylabel="recall accuracy (%)", ylim=(0, 102),
               title=f"{num_pairs} key-value pairs")  # fmt: skip
        ax.legend()
    fig.suptitle("MQAR: 2-layer models, best learning rate per setting")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
