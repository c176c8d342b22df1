"""Turn a results.json dictionary into a markdown table and PNG plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from efla.experiments.smnist.corruptions import CORRUPTIONS

NAMES = {"efla": "EFLA", "delta": "DeltaNet"}
_LOSS_WINDOW = 10  # steps in the moving average of the plotted loss
FLAT_TOLERANCE = 0.02  # "flat" at its end: the last 10 % of steps took at most 2 % of the run's whole fall in loss


def loss_flatness(curves: list[list[float]]) -> dict | None:
    """Is training past the knee of its loss curve? On the seed-mean training loss, with windows of 10 % of the steps:
    ``share_of_fall`` = (before - last) / (first - last), the fall from the second-to-last window to the last as a
    share of the whole fall from the first window to the last, and ``flat`` when |share_of_fall| <= FLAT_TOLERANCE.
    A curve that never fell (first <= last) is not flat: it has not reached its knee. The share, unlike the fall
    relative to the loss itself (``relative_drop``, also returned), does not penalise the model with the lower loss,
    whose batch-to-batch noise is a larger fraction of it. None for fewer than 2 steps or no finished seed."""
    if not curves or len(curves[0]) < 2:
        return None
    mean = np.mean(np.asarray(curves, dtype=np.float64), axis=0)
    window = max(1, len(mean) // 10)
    first, before, last = (float(x.mean()) for x in (mean[:window], mean[-2 * window : -window], mean[-window:]))
    share = (before - last) / (first - last) if first > last else None
    return {"window": window, "first": first, "before": before, "last": last, "share_of_fall": share,
            "relative_drop": (before - last) / before,
            "flat": share is not None and abs(share) <= FLAT_TOLERANCE}  # fmt: skip


def _flatness_cell(flatness: dict | None) -> str:
    """"yes: ..." / "no: ..." with the share of the whole fall in the last tenth of the steps, and how far the loss
    itself moved from the tenth before (several % for a flat curve too: a low loss's noise is a large part of it)."""
    if flatness is None:
        return "–"
    moved = -flatness["relative_drop"]
    change = f"{100 * abs(moved):.1f} % {'lower' if moved < 0 else 'higher'}"
    if flatness["share_of_fall"] is None:
        return f"no: the loss never fell over the run ({change} in the last tenth than in the tenth before)"
    return (f"{'yes' if flatness['flat'] else 'no'}: the last tenth of the steps gave "
            f"{100 * flatness['share_of_fall']:.1f} % of the whole fall (a loss {change} than in the tenth before)")


def area_under_curve(levels: list[float], accuracies: np.ndarray) -> np.ndarray:
    """Area under accuracy-vs-level curves divided by the level range: the grid's mean accuracy in %, per seed.

    ``accuracies`` is [n_levels, n_seeds]; trapezoidal rule over the (possibly uneven) ``levels``.
    """
    x = np.asarray(levels, dtype=np.float64)
    widths = np.diff(x)[:, None]
    area = (widths * (accuracies[1:] + accuracies[:-1]) / 2).sum(axis=0)
    return area / (x[-1] - x[0])


def _curve(entry: dict, name: str) -> tuple[list[float], np.ndarray]:
    """Levels and the [n_levels, n_seeds] accuracy array of one corruption in one method's results."""
    grid = entry[name]
    return [float(level) for level in grid], np.array([grid[level] for level in grid], dtype=np.float64)


def _cell(values: np.ndarray) -> str:
    if values.size == 0:
        return "–"  # no finished seed
    return f"{values.mean():.1f} ± {values.std():.1f}"


def _runs_cell(entry: dict) -> str:
    """Finished seeds, and each diverged one with its step."""
    cell = f"{len(entry['seeds'])} finished"
    diverged = [f"seed {d['seed']} diverged at step {d['step']} (loss {d['loss']})" for d in entry["diverged"]]
    return "; ".join([cell, *diverged])


def markdown_table(results: dict) -> str:
    """Clean accuracy, area under each robustness curve, and accuracy at every level: mean ± std over seeds."""
    methods = results["methods"]
    header = "| | " + " | ".join(NAMES.get(m, m) for m in methods) + " |"
    rule = "|---" * (len(methods) + 1) + "|"
    lines = ["Accuracy in % on the held-out split, mean ± std over finished seeds.", "", header, rule]
    lines.append("| runs | " + " | ".join(_runs_cell(methods[m]) for m in methods) + " |")
    lines.append("| learning rate | " + " | ".join(f"{methods[m]['lr']:g}" for m in methods) + " |")
    lines.append(f"| converged (the last tenth of the steps gave at most {100 * FLAT_TOLERANCE:g} % of the loss's "
                 f"whole fall) | " + " | ".join(_flatness_cell(methods[m].get("loss_flatness"))
                                                             for m in methods) + " |")  # fmt: skip
    lines.append("| clean | " + " | ".join(_cell(np.array(methods[m]["clean_accuracy"])) for m in methods) + " |")
    for c in CORRUPTIONS:
        cells = [_cell(area_under_curve(*_curve(methods[m], c.name))) for m in methods]
        lines.append(f"| area under curve: {c.label} | " + " | ".join(cells) + " |")
    for c in CORRUPTIONS:
        lines += ["", f"| {c.label} | " + " | ".join(NAMES.get(m, m) for m in methods) + " |", rule]
        curves = {m: _curve(methods[m], c.name)[1] for m in methods}
        for i, level in enumerate(c.levels):
            lines.append(f"| {level:g} | " + " | ".join(_cell(curves[m][i]) for m in methods) + " |")
    return "\n".join(lines)


def plot_results(results: dict, out: Path) -> list[Path]:
    """loss_curves.png (moving-average training loss) and robustness.png (accuracy vs each corruption).

    Lines are means over seeds; the band spans mean ± std across seeds.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    window = _LOSS_WINDOW
    for method, entry in methods.items():
        if not entry["loss_curves"]:
            continue  # every seed diverged
        curves = np.array(entry["loss_curves"], dtype=np.float64)  # [n_seeds, n_steps]
        window = min(_LOSS_WINDOW, curves.shape[1])  # runs of the same study share one length
        kernel = np.ones(window) / window
        smooth = np.array([np.convolve(c, kernel, mode="valid") for c in curves])
        steps = np.arange(window, curves.shape[1] + 1)
        mean, std = smooth.mean(0), smooth.std(0)
        ax.plot(steps, mean, label=f"{NAMES.get(method, method)} (lr {entry['lr']:g})")
        ax.fill_between(steps, mean - std, mean + std, alpha=0.25)
    ax.set(xlabel="step", ylabel=f"training loss ({window}-step mean)", title="sMNIST training loss")
    ax.legend()
    fig.tight_layout()
    paths = [out / "loss_curves.png"]
    fig.savefig(paths[0])
    plt.close(fig)

    fig, axes = plt.subplots(1, len(CORRUPTIONS), figsize=(4 * len(CORRUPTIONS), 3.2), dpi=100)
    for ax, c in zip(axes, CORRUPTIONS, strict=True):
        for method, entry in methods.items():
            if not entry["seeds"]:
                continue
            levels, acc = _curve(entry, c.name)
            mean, std = acc.mean(1), acc.std(1)
            ax.plot(levels, mean, marker="o", markersize=3, label=NAMES.get(method, method))
            ax.fill_between(levels, mean - std, mean + std, alpha=0.25)
        ax.axhline(10.0, color="grey", linestyle=":", linewidth=1)  # chance
        ax.set(xlabel=c.label, ylabel="test accuracy (%)", ylim=(0, 100))
        ax.legend()
    fig.suptitle("sMNIST accuracy under corruption (mean ± std over seeds; dotted: chance)")
    fig.tight_layout()
    paths.append(out / "robustness.png")
    fig.savefig(paths[1])
    plt.close(fig)
    return paths
