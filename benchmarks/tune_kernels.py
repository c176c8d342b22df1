"""Sweep the launch settings (V-block, warps, stages) of EFLA's Triton chunk kernels on this GPU.

    python benchmarks/tune_kernels.py [--shapes 8,4096,16,128 ...] [--steps 5] [--kernels state_fwd state_bwd] [--gated]

For bfloat16 inputs of each (B, T, H, D) shape (K = V = D) and mode "efla", every candidate setting of every kernel is
first compiled and checked on a small problem (its output and gradients must match the default settings' to 1e-2),
then timed: one forward+backward per step under the PyTorch profiler, the kernel's CUDA time summed over a step
(the forward kernels also run in the backward's recomputation), median over --steps steps. Candidates of different
kernels are timed in the same steps, since each kernel's time depends only on its own settings. It prints, per shape,
each kernel's default and best time and setting, then forward and forward+backward medians (triton.testing.do_bench)
with the defaults and with each shape's best settings, beside fla's chunk_delta_rule when fla-core is installed
(unless --no-fla). Candidates run as ``KernelSettings.launch_overrides`` in a ``kernel_settings`` block; copy the
winners into ``_default`` in ``efla/ops/triton/launch.py``. --kernels sweeps only those
kernels (the others keep their defaults), e.g. the two state passes at a low-parallelism shape, the only kernels whose
programs are few.
--gated sweeps the decay-gated kernels (gated EFLA, log decay as in ``kernels_vs_fla.py --gated``) beside fla's
chunk_gated_delta_rule.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import statistics
from collections import defaultdict

import torch
import triton
from kernels import inputs, measure  # benchmarks/kernels_vs_fla.py: the same bf16 inputs and timing
from torch.profiler import ProfilerActivity, profile

from efla import efla_attention
from efla.ops.triton.settings import Launch, kernel_settings

SHAPES = [(8, 4096, 16, 128), (2, 16384, 16, 128), (32, 1024, 16, 128), (8, 4096, 32, 64)]
KERNEL_NAMES = {"wy_fwd": "_wy_fwd_kernel", "state_fwd": "_state_fwd_kernel", "out": "_out_kernel",
                "state_bwd": "_state_bwd_kernel", "grad_qk": "_grad_qk_kernel", "grad_wy": "_grad_wy_kernel"}
# (V-blocks, warps, stages) tried per kernel. The state passes leave out one stage: with 4 warps and V-blocks of 16 or
# 32 Triton 3.6 miscompiled them on an H200 (wrong results, then an illegal address that ends the process). Deeper
# pipelines matter most to them: each chunk's loads are on the sequential pass's critical path. 2 warps never won
# for them at D = 64 or 128 (H200, 2026-12-02), so it is not compiled.
GRID = {
    "wy_fwd": ((64, 128), (4, 8), (1, 2)),
    "state_fwd": ((16, 32, 64), (4, 8), (2, 3, 4)),
    "out": ((64, 128), (4, 8), (1, 2, 3)),
    "state_bwd": ((16, 32, 64), (4, 8), (2, 3, 4)),
    "grad_qk": ((32, 64, 128), (4, 8), (1, 2)),
    "grad_wy": ((32, 64), (4, 8), (1, 2)),
}


def candidates(kernel: str, V: int) -> list[Launch]:
    """The kernel's grid of settings with V-blocks capped at V, without repeats."""
    seen = dict.fromkeys(Launch(min(bv, V), w, s) for bv, w, s in itertools.product(*GRID[kernel]))
    return list(seen)


def ours(q, k, v, beta, g=None):
    return efla_attention(q, k, v, beta, g=g, backend="triton", check_beta=False)[0]


def forward_backward(args, do) -> list[torch.Tensor]:
    for x in args:
        x.grad = None
    o = ours(*args)
    o.backward(do)
    return [o.detach()] + [x.grad for x in args]


def valid(kernel: str, D: int, gated: bool) -> list[Launch]:
    """The candidates that compile, run and agree with the default settings on a small problem."""
    args = inputs(2, 300, 2, D, gated)
    do = torch.randn_like(args[2])
    ref = forward_backward(args, do)
    good = []
    for cand in candidates(kernel, D):
        try:
            with kernel_settings(launch_overrides={kernel: cand}):
                out = forward_backward(args, do)
                torch.cuda.synchronize()
        except Exception as err:  # out of shared memory or registers (Triton raises several types): skip it
            if "illegal" in str(err) or isinstance(err, getattr(torch, "AcceleratorError", ())):
                raise SystemExit(f"{kernel} {cand} made an illegal memory access, which ends this process's CUDA "
                                 "context: leave the setting out of GRID and run again") from err
            print(f"  {kernel} {cand}: {type(err).__name__}", flush=True)
            continue
        errs = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(out, ref, strict=True)]
        if max(errs) <= 1e-2:
            good.append(cand)
        else:
            print(f"  {kernel} {cand}: disagrees with the default ({max(errs):.1e})", flush=True)
    return good


def kernel_times(args, do, steps: int) -> dict[str, float]:
    """Median per-step CUDA microseconds of each of our kernels over `steps` forward+backward steps."""
    per_step = defaultdict(list)
    for _ in range(2):
        forward_backward(args, do)
    for _ in range(steps):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            forward_backward(args, do)
            torch.cuda.synchronize()
        totals = defaultdict(float)
        for evt in prof.events():
            if evt.device_type == torch.autograd.DeviceType.CUDA:
                totals[evt.name] += evt.device_time_total
        for kernel, name in KERNEL_NAMES.items():
            per_step[kernel].append(totals.get(name, float("nan")))
    return {kernel: statistics.median(times) for kernel, times in per_step.items()}


def fla_times(args, do, gated: bool) -> tuple[float, float] | None:
    """Forward and forward+backward median ms of fla's DeltaNet kernel (Gated DeltaNet's if gated), or None without
    fla-core."""
    try:
        if gated:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule
            from fla_guard import time_fla_gated_backward_anyway
        else:
            from fla.ops.delta_rule import chunk_delta_rule
    except ImportError:
        return None
    if gated:
        time_fla_gated_backward_anyway()
        return measure(lambda q, k, v, beta, g: chunk_gated_delta_rule(q, k, v, g, beta)[0], args, do)[:2]
    return measure(lambda *x: chunk_delta_rule(*x)[0], args, do)[:2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--shapes", nargs="*", default=None, help="B,T,H,D for each shape (default: the issue's)")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per setting")
    parser.add_argument("--kernels", nargs="+", default=list(KERNEL_NAMES), choices=list(KERNEL_NAMES),
                        help="the kernels to sweep (default: all)")
    parser.add_argument("--gated", action="store_true", help="the decay-gated kernels (gated EFLA)")
    parser.add_argument("--no-fla", action="store_true",
                        help="leave out fla's times (fla autotunes on first use: minutes on a fresh machine)")
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{datetime.date.today()}; bf16, mode efla{', gated' if args.gated else ''}; kernel times: median CUDA us "
          "per forward+backward", flush=True)
    torch.manual_seed(1)
    pools = {}
    for D in sorted({s[3] for s in shapes}):
        pools[D] = {kernel: valid(kernel, D, args.gated) for kernel in args.kernels}
        print(f"D={D}: " + ", ".join(f"{k} {len(v)}" for k, v in pools[D].items()) + " valid settings", flush=True)
    summary = []
    torch.manual_seed(0)
    for B, T, H, D in shapes:
        x = inputs(B, T, H, D, args.gated)
        do = torch.randn_like(x[2])
        pool = pools[D]
        default = kernel_times(x, do, args.steps)
        results = defaultdict(dict)  # kernel -> setting -> us
        for i in range(max(len(c) for c in pool.values())):
            trial = {kernel: c[i] for kernel, c in pool.items() if i < len(c)}
            with kernel_settings(launch_overrides=trial):
                times = kernel_times(x, do, args.steps)
            for kernel, setting in trial.items():
                results[kernel][setting] = times[kernel]
        best = {kernel: min(times, key=times.get) for kernel, times in results.items()}
        print(f"\n{B}x{T}x{H}x{D}: kernel | default us | best us | best (bv, warps, stages)")
        for kernel in args.kernels:
            print(f"  {kernel:<10} | {default[kernel]:8.1f} | {results[kernel][best[kernel]]:8.1f} | "
                  f"{best[kernel].bv}, {best[kernel].warps}, {best[kernel].stages}", flush=True)
        row = {"shape": f"{B}x{T}x{H}x{D}", "default": measure(ours, x, do)[:2]}
        with kernel_settings(launch_overrides=best):
            row["best"] = measure(ours, x, do)[:2]
            with kernel_settings(save_t=False):
                row["best, T recomputed"] = measure(ours, x, do)[:2]
        row["fla"] = None if args.no_fla else fla_times(x, do, args.gated)
        summary.append(row)
        del x, do
    print("\nshape | settings | fwd ms | fwd+bwd ms | vs fla fwd | vs fla f+b")
    for row in summary:
        base = row["fla"]
        for name in ("default", "best", "best, T recomputed", "fla"):
            if row[name] is None:
                continue
            fwd, both = row[name]
            ratio = f"{fwd / base[0]:.2f} | {both / base[1]:.2f}" if base else "- | -"
            print(f"{row['shape']} | {name} | {fwd:.3f} | {both:.3f} | {ratio}")


if __name__ == "__main__":
    main()
