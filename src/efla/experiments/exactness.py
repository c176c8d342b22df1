"""Exactness study: error of Euler (DeltaNet), RK2, RK4 and EFLA against the matrix-exponential solution of the ODE.

Three sweeps, all in float64 on random keys, values and states (errors are ||out - ref|| / ||ref||):
one step vs stiffness beta * ||k||^2; a whole sequence vs the sub-step size h = beta / n, with the fitted convergence
order; the final state vs sequence length. Two more for the gated ODE dS/dt = -(c I + k k^T) S + k v^T (log decay
g = -beta c per token): one step over a grid of stiffness and decay, and the final state of a sequence per decay, with
Gated DeltaNet beside the integrators and gated EFLA. Prints markdown tables and writes table.md, exactness.png and
gated.png to --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
from pathlib import Path

import torch

from efla.cli import missing_extra
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


def _decay(text: str) -> float:
    """argparse type of --decay: -g, a decay per token, >= 0."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"-g is the decay per token and must be >= 0 (got {text})")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The study's knobs; the defaults take a few seconds on 2 CPU cores."""
    parser.add_argument("--out", type=Path, default=Path("runs/exactness"), help="output folder (table.md, PNG)")
    parser.add_argument("--dim", type=int, default=16, help="key and value dimension K = V")
    parser.add_argument("--batch", type=int, default=8, help="independent random problems per measurement")
    parser.add_argument("--stiffness", type=float, nargs="+", default=[1e-3, 1e-2, 0.1, 0.5, 1, 2, 2.5, 5, 10, 100],
                        help="beta * ||k||^2 values of the one-step sweep")
    parser.add_argument("--substeps", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64],
                        help="sub-step counts n of the convergence sweep (h = beta / n)")
    parser.add_argument("--order-stiffness", type=float, default=1.0, help="beta * ||k||^2 per token, convergence")
    parser.add_argument("--order-length", type=int, default=16, help="sequence length of the convergence sweep")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1, 10, 100, 1000],
                        help="sequence lengths of the length sweep, ascending")
    parser.add_argument("--length-stiffness", type=float, nargs="+", default=[0.5, 2.5],
                        help="beta * ||k||^2 per token of the length sweep")
    parser.add_argument("--decay", type=_decay, nargs="+", default=[0.01, 0.1, 1, 3, 10],
                        help="-g values (log decay per token, >= 0 here) of the gated sweeps")
    parser.add_argument("--gated-stiffness", type=float, nargs="+", default=[0.1, 1, 10],
                        help="beta * ||k||^2 values of the gated one-step sweep")
    parser.add_argument("--gated-length", type=int, default=100,
                        help="sequence length of the gated sequence sweep (stiffness from --length-stiffness)")
    parser.add_argument("--seed", type=int, default=0)


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


def stiffness_sweep(args: argparse.Namespace, generator: torch.Generator) -> dict[str, list[float]]:
    """One step from a random state: relative error of each method (n = 1) per beta * ||k||^2."""
    x = torch.tensor(args.stiffness, dtype=torch.float64)
    k, v, state, beta = random_problem(args.batch, len(x), args.dim, x, generator)
    state = state.expand(-1, len(x), -1, -1)
    k, v, beta = k[:, :, 0], v[:, :, 0], beta[:, :, 0]  # tokens of one problem act as independent steps here
    ref = exact_step(state, k, v, beta)
    outputs = {name: step(state, k, v, beta) for name, step in _STEPS.items()}
    outputs["efla"] = efla_step(state, k, v, beta)
    return {name: [relative_error(out[:, i], ref[:, i]) for i in range(len(x))] for name, out in outputs.items()}


def convergence_sweep(args: argparse.Namespace, generator: torch.Generator) -> dict[str, list[float]]:
    """A whole sequence: relative error of the final state per sub-step count n (EFLA has no sub-steps)."""
    k, v, state, beta = random_problem(args.batch, args.order_length, args.dim, args.order_stiffness, generator)
    ref = solve_sequence(k, v, beta, "exact", initial_state=state)
    errors = {name: [relative_error(solve_sequence(k, v, beta, name, steps=n, initial_state=state), ref)
                     for n in args.substeps] for name in INTEGRATORS}
    errors["efla"] = [relative_error(solve_sequence(k, v, beta, "efla", initial_state=state), ref)] * len(args.substeps)
    return errors


def fitted_orders(substeps: list[int], errors: dict[str, list[float]]) -> dict[str, float]:
    """Convergence order of each integrator, fitted on its smallest step sizes whose error is above the round-off
    floor (nan if fewer than two)."""
    orders = {}
    for name in INTEGRATORS:
        points = sorted((1 / n, e) for n, e in zip(substeps, errors[name], strict=True) if e > _ORDER_FIT_FLOOR)
        points = points[:_ORDER_FIT_POINTS]
        orders[name] = convergence_order(*map(list, zip(*points, strict=True))) if len(points) > 1 else float("nan")
    return orders


def length_sweep(args: argparse.Namespace, generator: torch.Generator) -> dict[float, dict[str, list[float]]]:
    """Final state after T tokens from a random state, n = 1, per stiffness and length.

    Each method runs once over the longest sequence, in segments between the requested lengths, carrying its own
    state from one segment to the next (the state is all the recurrence carries, so this equals separate runs).
    """
    bounds = [0, *args.lengths]
    if bounds != sorted(set(bounds)):
        raise ValueError(f"--lengths must be positive and strictly ascending (got {args.lengths})")
    results = {}
    for x in args.length_stiffness:
        k, v, state, beta = random_problem(args.batch, bounds[-1], args.dim, x, generator)
        states = {name: [state] for name in ("exact", *METHODS)}
        for start, end in itertools.pairwise(bounds):
            for name, history in states.items():
                history.append(solve_sequence(k[:, start:end], v[:, start:end], beta[:, start:end], name,
                                              initial_state=history[-1]))
        results[x] = {name: [relative_error(out, ref) for out, ref in zip(states[name][1:], states["exact"][1:],
                                                                           strict=True)] for name in METHODS}
    return results


def _check_decays(decays: list[float]) -> None:
    if min(decays) < 0:
        raise ValueError(f"--decay takes -g, the decay per token, which must be >= 0 (got {min(decays):g})")


def gated_stiffness_sweep(args: argparse.Namespace, generator: torch.Generator
                          ) -> dict[tuple[float, float], dict[str, float]]:
    """One gated step from a random state: relative error of each method (n = 1) per (beta * ||k||^2, -g)."""
    _check_decays(args.decay)
    grid = list(itertools.product(args.gated_stiffness, args.decay))
    x = torch.tensor([s for s, _ in grid], dtype=torch.float64)
    k, v, state, beta = random_problem(args.batch, len(grid), args.dim, x, generator)
    state = state.expand(-1, len(grid), -1, -1)
    k, v, beta = k[:, :, 0], v[:, :, 0], beta[:, :, 0]  # tokens of one problem act as independent steps here
    g = -torch.tensor([d for _, d in grid], dtype=torch.float64).expand_as(beta)
    ref = exact_step(state, k, v, beta, g)
    outputs = {name: step(state, k, v, beta, g=g) for name, step in _STEPS.items()}
    outputs["delta"] = delta_step(state, k, v, beta, g)
    outputs["efla"] = efla_step(state, k, v, beta, g)
    return {point: {name: relative_error(out[:, i], ref[:, i]) for name, out in outputs.items()}
            for i, point in enumerate(grid)}


def gated_sequence_sweep(args: argparse.Namespace, generator: torch.Generator
                         ) -> dict[tuple[float, float], dict[str, float]]:
    """The final state after --gated-length tokens from a random state, n = 1, per (beta * ||k||^2, -g)."""
    _check_decays(args.decay)
    results = {}
    for x, decay in itertools.product(args.length_stiffness, args.decay):
        k, v, state, beta = random_problem(args.batch, args.gated_length, args.dim, x, generator)
        g = torch.full_like(beta, -decay)
        ref = solve_sequence(k, v, beta, "exact", initial_state=state, g=g)
        results[x, decay] = {name: relative_error(solve_sequence(k, v, beta, name, initial_state=state, g=g), ref)
                             for name in GATED_METHODS}
    return results


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(header), _row(["---:"] * len(header)), *(_row(r) for r in rows)]


def format_tables(args: argparse.Namespace, stiff: dict[str, list[float]], conv: dict[str, list[float]],
                  orders: dict[str, float], lengths: dict[float, dict[str, list[float]]]) -> str:
    """The three sweeps as markdown tables."""
    lines = [f"float64, K = V = {args.dim}, {args.batch} random problems per entry, seed {args.seed}; "
             "error = ||S - S_exact|| / ||S_exact||, S_exact by matrix exponential", "",
             "### One step: relative error vs stiffness beta*lam (lam = ||k||^2, n = 1 sub-step)", ""]
    lines += _table(["beta*lam", *METHODS],
                    [[f"{x:g}", *(f"{stiff[m][i]:.2e}" for m in METHODS)] for i, x in enumerate(args.stiffness)])
    lines += ["", f"### Convergence: {args.order_length}-token sequence, beta*lam = {args.order_stiffness:g} per "
              "token, n sub-steps of h = beta/n", ""]
    rows = [[str(n), f"{args.order_stiffness / n:.4g}", *(f"{conv[m][i]:.2e}" for m in METHODS)]
            for i, n in enumerate(args.substeps)]
    rows.append(["order (fit)", "", *(f"{orders[m]:.2f}" for m in INTEGRATORS), "exact"])
    lines += _table(["n", "h*lam", *METHODS], rows)
    lines += ["", "### Sequence length: relative error of the final state (n = 1)", ""]
    rows = [[f"{x:g}", str(T), *(f"{errs[m][i]:.2e}" for m in METHODS)]
            for x, errs in lengths.items() for i, T in enumerate(args.lengths)]
    lines += _table(["beta*lam", "T", *METHODS], rows)
    return "\n".join(lines) + "\n"


def format_gated_tables(args: argparse.Namespace, one_step: dict[tuple[float, float], dict[str, float]],
                        sequence: dict[tuple[float, float], dict[str, float]]) -> str:
    """The two gated sweeps as markdown tables."""
    header = ["beta*lam", "-g", *(_GATED_LABELS.get(m, m) for m in GATED_METHODS)]

    def rows(results: dict[tuple[float, float], dict[str, float]]) -> list[list[str]]:
        return [[f"{x:g}", f"{d:g}", *(f"{errs[m]:.2e}" for m in GATED_METHODS)] for (x, d), errs in results.items()]

    lines = ["", "Gated: dS/dt = -(c I + k k^T) S + k v^T with log decay g = -beta c per token; gated delta = Gated "
             "DeltaNet, exp(g) (I - beta k k^T) S + beta k v^T; efla = gated EFLA", "",
             "### Gated, one step: relative error vs stiffness beta*lam and decay -g (n = 1 sub-step)", ""]
    lines += _table(header, rows(one_step))
    lines += ["", f"### Gated sequence: relative error of the final state after {args.gated_length} tokens (n = 1)", ""]
    lines += _table(header, rows(sequence))
    return "\n".join(lines) + "\n"


def plot(args: argparse.Namespace, stiff: dict[str, list[float]], conv: dict[str, list[float]],
         orders: dict[str, float], lengths: dict[float, dict[str, list[float]]], path: Path) -> None:
    """Three log-log panels: error vs stiffness, vs sub-step size (with fitted orders), vs sequence length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-18  # an error that is exactly 0 still has to show on a log axis
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for m in METHODS:
        axes[0].loglog(args.stiffness, [max(e, floor) for e in stiff[m]], "o-", label=m)
        label = f"{m} (order {orders[m]:.2f})" if m in orders else m
        axes[1].loglog([args.order_stiffness / n for n in args.substeps], [max(e, floor) for e in conv[m]], "o-",
                       label=label)
        for x, style in zip(lengths, ("o-", "s--", "^:", "d-."), strict=False):
            axes[2].loglog(args.lengths, [max(e, floor) for e in lengths[x][m]], style,
                           color=axes[0].lines[-1].get_color(), label=f"{m}, beta*lam={x:g}")
    titles = ("one step vs stiffness (n = 1)", f"{args.order_length} tokens vs sub-step size",
              "final state vs sequence length (n = 1)")
    for ax, title, xlabel in zip(axes, titles, ("beta * ||k||^2", "h * ||k||^2", "T"), strict=True):
        ax.set(title=title, xlabel=xlabel, ylabel="||S - S_exact|| / ||S_exact||")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gated(args: argparse.Namespace, one_step: dict[tuple[float, float], dict[str, float]],
               sequence: dict[tuple[float, float], dict[str, float]], path: Path) -> None:
    """Two panels, error vs decay -g: one gated step (a line per stiffness) and a gated sequence's final state."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor, ceiling = 1e-18, 1e4  # diverged integrators (errors up to inf) are drawn at the ceiling
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = ("o-", "s--", "^:", "d-.")
    for ax, results, stiffnesses in ((axes[0], one_step, args.gated_stiffness),
                                     (axes[1], sequence, args.length_stiffness)):
        for color, m in enumerate(GATED_METHODS):
            for x, style in zip(stiffnesses, styles, strict=False):
                errors = [min(max(results[x, d][m], floor), ceiling) for d in args.decay]
                label = f"{_GATED_LABELS.get(m, m)}, beta*lam={x:g}"
                ax.plot(args.decay, errors, style, color=f"C{color}", label=label)
        if min(args.decay) > 0:
            ax.set_xscale("log")
        else:  # -g = 0 (no decay) on the axis too
            ax.set_xscale("symlog", linthresh=min([d for d in args.decay if d > 0], default=1.0))
            ax.set_xlim(left=0)
        ax.set(yscale="log", xlabel="-g (log decay per token)", ylabel="||S - S_exact|| / ||S_exact|| (capped at 1e4)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    axes[0].set_title("gated, one step (n = 1)")
    axes[1].set_title(f"gated, final state after {args.gated_length} tokens (n = 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> None:
    """Run the five sweeps, print the tables, write table.md, exactness.png and gated.png to ``args.out``."""
    if importlib.util.find_spec("matplotlib") is None:  # before the work, not after the table: the plots need it
        raise missing_extra(ModuleNotFoundError(name="matplotlib"), "smnist")
    generator = torch.Generator().manual_seed(args.seed)
    # Thousands of tiny per-token ops: extra threads only add synchronisation, and on a loaded 2-core machine two
    # threads made the matrix-exponential recurrence ~25x slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stiff = stiffness_sweep(args, generator)
        conv = convergence_sweep(args, generator)
        orders = fitted_orders(args.substeps, conv)
        lengths = length_sweep(args, generator)
        gated_one_step = gated_stiffness_sweep(args, generator)
        gated_sequence = gated_sequence_sweep(args, generator)
    finally:
        torch.set_num_threads(threads)
    table = format_tables(args, stiff, conv, orders, lengths) + format_gated_tables(args, gated_one_step,
                                                                                    gated_sequence)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table)
    plot(args, stiff, conv, orders, lengths, args.out / "exactness.png")
    plot_gated(args, gated_one_step, gated_sequence, args.out / "gated.png")
    print(table)
    print(f"wrote {args.out / 'table.md'}, {args.out / 'exactness.png'} and {args.out / 'gated.png'}")
