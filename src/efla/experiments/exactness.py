"""Exactness study: error of Euler (DeltaNet), RK2, RK4 and EFLA against the matrix-exponential solution of the ODE.

Three sweeps, all in float64 on random keys, values and states (errors are ||out - ref|| / ||ref||):
one step vs stiffness beta * ||k||^2; a whole sequence vs the sub-step size h = beta / n, with the fitted convergence
order; the final state vs sequence length. Two more for the gated ODE dS/dt = -(c I + k k^T) S + k v^T (log decay
g = -beta c per token): one step over a grid of stiffness and decay, and the final state of a sequence per decay, with
Gated DeltaNet beside the integrators and gated EFLA. ``run_exactness(ExactnessConfig(), out)`` writes the markdown
tables (table.md) and the plots (exactness.png, gated.png) to ``out``; ``efla exactness`` is its command.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path

import torch

from efla.dynamics import (
    convergence_order,
    delta_step,
    efla_step,
    euler_step,
    exact_step,
    relative_error,
    rk2_step,
    rk4_step,
    solve_sequence,
)

_STEPS = {"euler": euler_step, "rk2": rk2_step, "rk4": rk4_step}
INTEGRATORS = tuple(_STEPS)
METHODS = (*INTEGRATORS, "efla")
GATED_METHODS = (*INTEGRATORS, "delta", "efla")
_GATED_LABELS = {"delta": "gated delta"}  # Gated DeltaNet: exact decay, then an Euler step of the ungated ODE
_ORDER_FIT_FLOOR = 1e-11  # errors below this sit too close to float64 round-off to show the asymptotic order
_ORDER_FIT_POINTS = 4  # fit the smallest step sizes only: the largest are not yet in the asymptotic regime


@dataclasses.dataclass(frozen=True)
class ExactnessConfig:
    """The study's knobs; the defaults take a few seconds on 2 CPU cores."""

    dim: int = 16  # key and value dimension K = V
    batch: int = 8  # independent random problems per measurement
    stiffness: tuple[float, ...] = (1e-3, 1e-2, 0.1, 0.5, 1, 2, 2.5, 5, 10, 100)  # beta ||k||^2, one-step sweep
    substeps: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # sub-step counts n of the convergence sweep (h = beta / n)
    order_stiffness: float = 1.0  # beta ||k||^2 per token of the convergence sweep
    order_length: int = 16  # sequence length of the convergence sweep
    lengths: tuple[int, ...] = (1, 10, 100, 1000)  # sequence lengths of the length sweep, ascending
    length_stiffness: tuple[float, ...] = (0.5, 2.5)  # beta ||k||^2 per token of the length and gated sequence sweeps
    decay: tuple[float, ...] = (0.01, 0.1, 1, 3, 10)  # -g values (log decay per token, >= 0) of the gated sweeps
    gated_stiffness: tuple[float, ...] = (0.1, 1, 10)  # beta ||k||^2 values of the gated one-step sweep
    gated_length: int = 100  # sequence length of the gated sequence sweep
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse settings a sweep cannot use, before any of them runs."""
        if list(self.lengths) != sorted(set(self.lengths)) or min(self.lengths) < 1:
            raise ValueError(f"--lengths must be positive and strictly ascending (got {list(self.lengths)})")
        if min(self.decay) < 0:
            raise ValueError(f"--decay takes -g, the decay per token, which must be >= 0 (got {min(self.decay):g})")


def random_problem(batch: int, length: int, dim: int, stiffness: float | torch.Tensor, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random float64 k [B, T, 1, K], v [B, T, 1, V], initial state [B, 1, K, V] and beta [B, T, 1] chosen so that
    beta_t ||k_t||^2 = stiffness at every token (a scalar, or [T] to vary it along the sequence)."""
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    k = randn(batch, length, 1, dim) / dim**0.5
    v = randn(batch, length, 1, dim)
    state = randn(batch, 1, dim, dim)
    stiffness = torch.as_tensor(stiffness, dtype=torch.float64).reshape(-1, 1)
    return k, v, state, stiffness / k.square().sum(-1)


def stiffness_sweep(config: ExactnessConfig, generator: torch.Generator) -> dict[str, list[float]]:
    """One step from a random state: relative error of each method (n = 1) per beta * ||k||^2."""
    x = torch.tensor(config.stiffness, dtype=torch.float64)
    k, v, state, beta = random_problem(config.batch, len(x), config.dim, x, generator)
    state = state.expand(-1, len(x), -1, -1)
    k, v, beta = k[:, :, 0], v[:, :, 0], beta[:, :, 0]  # tokens of one problem act as independent steps here
    ref = exact_step(state, k, v, beta)
    outputs = {name: step(state, k, v, beta) for name, step in _STEPS.items()}
    outputs["efla"] = efla_step(state, k, v, beta)
    return {name: [relative_error(out[:, i], ref[:, i]) for i in range(len(x))] for name, out in outputs.items()}


def convergence_sweep(config: ExactnessConfig, generator: torch.Generator) -> dict[str, list[float]]:
    """A whole sequence: relative error of the final state per sub-step count n (EFLA has no sub-steps)."""
    k, v, state, beta = random_problem(config.batch, config.order_length, config.dim, config.order_stiffness, generator)
    ref = solve_sequence(k, v, beta, "exact", initial_state=state)
    errors = {name: [relative_error(solve_sequence(k, v, beta, name, steps=n, initial_state=state), ref)
                     for n in config.substeps] for name in INTEGRATORS}
    efla_error = relative_error(solve_sequence(k, v, beta, "efla", initial_state=state), ref)
    errors["efla"] = [efla_error] * len(config.substeps)
    return errors


def fitted_orders(substeps: Sequence[int], errors: dict[str, list[float]]) -> dict[str, float]:
    """Convergence order of each integrator, fitted on its smallest step sizes whose error is above the round-off
    floor (nan if fewer than two)."""
    orders = {}
    for name in INTEGRATORS:
        points = sorted((1 / n, e) for n, e in zip(substeps, errors[name], strict=True) if e > _ORDER_FIT_FLOOR)
        points = points[:_ORDER_FIT_POINTS]
        orders[name] = convergence_order(*map(list, zip(*points, strict=True))) if len(points) > 1 else float("nan")
    return orders


def length_sweep(config: ExactnessConfig, generator: torch.Generator) -> dict[float, dict[str, list[float]]]:
    """Final state after T tokens from a random state, n = 1, per stiffness and length.

    Each method runs once over the longest sequence, in segments between the requested lengths, carrying its own
    state from one segment to the next (the state is all the recurrence carries, so this equals separate runs).
    """
    bounds = [0, *config.lengths]
    results = {}
    for x in config.length_stiffness:
        k, v, state, beta = random_problem(config.batch, bounds[-1], config.dim, x, generator)
        states = {name: [state] for name in ("exact", *METHODS)}
        for start, end in itertools.pairwise(bounds):
            for name, history in states.items():
                history.append(solve_sequence(k[:, start:end], v[:, start:end], beta[:, start:end], name,
                                              initial_state=history[-1]))
        results[x] = {name: [relative_error(out, ref) for out, ref in zip(states[name][1:], states["exact"][1:],
                                                                           strict=True)] for name in METHODS}
    return results


def gated_stiffness_sweep(config: ExactnessConfig, generator: torch.Generator
                          ) -> dict[tuple[float, float], dict[str, float]]:
    """One gated step from a random state: relative error of each method (n = 1) per (beta * ||k||^2, -g)."""
    grid = list(itertools.product(config.gated_stiffness, config.decay))
    x = torch.tensor([s for s, _ in grid], dtype=torch.float64)
    k, v, state, beta = random_problem(config.batch, len(grid), config.dim, x, generator)
    state = state.expand(-1, len(grid), -1, -1)
    k, v, beta = k[:, :, 0], v[:, :, 0], beta[:, :, 0]  # tokens of one problem act as independent steps here
    g = -torch.tensor([d for _, d in grid], dtype=torch.float64).expand_as(beta)
    ref = exact_step(state, k, v, beta, g)
    outputs = {name: step(state, k, v, beta, g=g) for name, step in _STEPS.items()}
    outputs["delta"] = delta_step(state, k, v, beta, g)
    outputs["efla"] = efla_step(state, k, v, beta, g)
    return {point: {name: relative_error(out[:, i], ref[:, i]) for name, out in outputs.items()}
            for i, point in enumerate(grid)}


def gated_sequence_sweep(config: ExactnessConfig, generator: torch.Generator
                         ) -> dict[tuple[float, float], dict[str, float]]:
    """The final state after --gated-length tokens from a random state, n = 1, per (beta * ||k||^2, -g)."""
    results = {}
    for x, decay in itertools.product(config.length_stiffness, config.decay):
        k, v, state, beta = random_problem(config.batch, config.gated_length, config.dim, x, generator)
        g = torch.full_like(beta, -decay)
        ref = solve_sequence(k, v, beta, "exact", initial_state=state, g=g)
        results[x, decay] = {name: relative_error(solve_sequence(k, v, beta, name, initial_state=state, g=g), ref)
                             for name in GATED_METHODS}
    return results


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(header), _row(["---:"] * len(header)), *(_row(r) for r in rows)]


def format_tables(config: ExactnessConfig, stiff: dict[str, list[float]], conv: dict[str, list[float]],
                  orders: dict[str, float], lengths: dict[float, dict[str, list[float]]]) -> str:
    """The three sweeps as markdown tables."""
    lines = [f"float64, K = V = {config.dim}, {config.batch} random problems per entry, seed {config.seed}; "
             "error = ||S - S_exact|| / ||S_exact||, S_exact by matrix exponential", "",
             "### One step: relative error vs stiffness beta*lam (lam = ||k||^2, n = 1 sub-step)", ""]
    lines += _table(["beta*lam", *METHODS],
                    [[f"{x:g}", *(f"{stiff[m][i]:.2e}" for m in METHODS)] for i, x in enumerate(config.stiffness)])
    lines += ["", f"### Convergence: {config.order_length}-token sequence, beta*lam = {config.order_stiffness:g} per "
              "token, n sub-steps of h = beta/n", ""]
    rows = [[str(n), f"{config.order_stiffness / n:.4g}", *(f"{conv[m][i]:.2e}" for m in METHODS)]
            for i, n in enumerate(config.substeps)]
    rows.append(["order (fit)", "", *(f"{orders[m]:.2f}" for m in INTEGRATORS), "exact"])
    lines += _table(["n", "h*lam", *METHODS], rows)
    lines += ["", "### Sequence length: relative error of the final state (n = 1)", ""]
    rows = [[f"{x:g}", str(T), *(f"{errs[m][i]:.2e}" for m in METHODS)]
            for x, errs in lengths.items() for i, T in enumerate(config.lengths)]
    lines += _table(["beta*lam", "T", *METHODS], rows)
    return "\n".join(lines) + "\n"


def format_gated_tables(config: ExactnessConfig, one_step: dict[tuple[float, float], dict[str, float]],
                        sequence: dict[tuple[float, float], dict[str, float]]) -> str:
    """The two gated sweeps as markdown tables."""
    header = ["beta*lam", "-g", *(_GATED_LABELS.get(m, m) for m in GATED_METHODS)]

    def rows(results: dict[tuple[float, float], dict[str, float]]) -> list[list[str]]:
        return [[f"{x:g}", f"{d:g}", *(f"{errs[m]:.2e}" for m in GATED_METHODS)] for (x, d), errs in results.items()]

    lines = ["", "Gated: dS/dt = -(c I + k k^T) S + k v^T with log decay g = -beta c per token; gated delta = Gated "
             "DeltaNet, exp(g) (I - beta k k^T) S + beta k v^T; efla = gated EFLA", "",
             "### Gated, one step: relative error vs stiffness beta*lam and decay -g (n = 1 sub-step)", ""]
    lines += _table(header, rows(one_step))
    lines += ["", f"### Gated sequence: relative error of the final state after {config.gated_length} tokens "
              "(n = 1)", ""]
    lines += _table(header, rows(sequence))
    return "\n".join(lines) + "\n"


def plot(config: ExactnessConfig, stiff: dict[str, list[float]], conv: dict[str, list[float]],
         orders: dict[str, float], lengths: dict[float, dict[str, list[float]]], path: Path) -> None:
    """Three log-log panels: error vs stiffness, vs sub-step size (with fitted orders), vs sequence length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-18  # an error that is exactly 0 still has to show on a log axis
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for m in METHODS:
        axes[0].loglog(config.stiffness, [max(e, floor) for e in stiff[m]], "o-", label=m)
        label = f"{m} (order {orders[m]:.2f})" if m in orders else m
        axes[1].loglog([config.order_stiffness / n for n in config.substeps], [max(e, floor) for e in conv[m]], "o-",
                       label=label)
        for x, style in zip(lengths, ("o-", "s--", "^:", "d-."), strict=False):
            axes[2].loglog(config.lengths, [max(e, floor) for e in lengths[x][m]], style,
                           color=axes[0].lines[-1].get_color(), label=f"{m}, beta*lam={x:g}")
    titles = ("one step vs stiffness (n = 1)", f"{config.order_length} tokens vs sub-step size",
              "final state vs sequence length (n = 1)")
    for ax, title, xlabel in zip(axes, titles, ("beta * ||k||^2", "h * ||k||^2", "T"), strict=True):
        ax.set(title=title, xlabel=xlabel, ylabel="||S - S_exact|| / ||S_exact||")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gated(config: ExactnessConfig, one_step: dict[tuple[float, float], dict[str, float]],
               sequence: dict[tuple[float, float], dict[str, float]], path: Path) -> None:
    """Two panels, error vs decay -g: one gated step (a line per stiffness) and a gated sequence's final state."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor, ceiling = 1e-18, 1e4  # diverged integrators (errors up to inf) are drawn at the ceiling
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = ("o-", "s--", "^:", "d-.")
    for ax, results, stiffnesses in ((axes[0], one_step, config.gated_stiffness),
                                     (axes[1], sequence, config.length_stiffness)):
        for color, m in enumerate(GATED_METHODS):
            for x, style in zip(stiffnesses, styles, strict=False):
                errors = [min(max(results[x, d][m], floor), ceiling) for d in config.decay]
                label = f"{_GATED_LABELS.get(m, m)}, beta*lam={x:g}"
                ax.plot(config.decay, errors, style, color=f"C{color}", label=label)
        if min(config.decay) > 0:
            ax.set_xscale("log")
        else:  # -g = 0 (no decay) on the axis too
            ax.set_xscale("symlog", linthresh=min([d for d in config.decay if d > 0], default=1.0))
            ax.set_xlim(left=0)
        ax.set(yscale="log", xlabel="-g (log decay per token)", ylabel="||S - S_exact|| / ||S_exact|| (capped at 1e4)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    axes[0].set_title("gated, one step (n = 1)")
    axes[1].set_title(f"gated, final state after {config.gated_length} tokens (n = 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_exactness(config: ExactnessConfig, out: Path) -> str:
    """Run the five sweeps, write table.md, exactness.png and gated.png to ``out`` (needs matplotlib) and return the
    tables as markdown."""
    generator = torch.Generator().manual_seed(config.seed)
    # Thousands of tiny per-token ops: extra threads only add synchronisation, and on a loaded 2-core machine two
    # threads made the matrix-exponential recurrence ~25x slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stiff = stiffness_sweep(config, generator)
        conv = convergence_sweep(config, generator)
        orders = fitted_orders(config.substeps, conv)
        lengths = length_sweep(config, generator)
        gated_one_step = gated_stiffness_sweep(config, generator)
        gated_sequence = gated_sequence_sweep(config, generator)
    finally:
        torch.set_num_threads(threads)
    table = format_tables(config, stiff, conv, orders, lengths) + format_gated_tables(config, gated_one_step,
                                                                                      gated_sequence)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table)
    plot(config, stiff, conv, orders, lengths, out / "exactness.png")
    plot_gated(config, gated_one_step, gated_sequence, out / "gated.png")
    return table
