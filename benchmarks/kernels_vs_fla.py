"""Kernel benchmark: EFLA's Triton kernels against fla's DeltaNet kernel, EFLA through fla, and PyTorch SDPA.

    python benchmarks/kernels_vs_fla.py [--shapes 8,4096,16,128 ...] [--profile [INDEX ...]] [--gated] [--out FILE]

For bfloat16 inputs of each (B, T, H, D) shape (K = V = D) it times, with triton.testing.do_bench medians, the
forward and forward+backward of: ours (backend="triton", modes efla and delta), fla's chunk_delta_rule (DeltaNet,
the baseline every ratio is taken against), EFLA through fla (alpha computed in PyTorch, then chunk_delta_rule) and
causal SDPA (flash). It measures the copy bandwidth and bf16 matmul rate of the GPU in the same run and reports each
forward's achieved TB/s (bytes of q, k, v, beta, o once) and TFLOP/s (chunkwise model below) against them, plus peak
memory of forward+backward above the inputs, and the relative error of ours against EFLA through fla. --profile
also prints the per-kernel CUDA time of one forward+backward of ours (both modes) and of fla at the first shape (or
the shapes whose indices follow it). --gated times the decay-gated forms instead, with a log decay
g = logsigmoid(x) / 16 (x normal, fla's test convention): ours (gated EFLA and Gated DeltaNet) against fla's
chunk_gated_delta_rule (Gated DeltaNet, the baseline) and gated EFLA through fla.
Every row (and, with --profile, every kernel's time) is appended to --out as a JSON line as soon as it is measured
(default: a new dated file in benchmarks/results/, from which benchmarks/report.py writes BENCHMARKS.md's tables).
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from fla_guard import time_fla_gated_backward_anyway
from results_io import ResultsWriter

from efla import efla_attention

SHAPES = [(8, 4096, 16, 128), (2, 16384, 16, 128), (32, 1024, 16, 128), (8, 4096, 32, 64),
          # low parallelism (batch x heads <= 16): the shapes of long-context training
          (1, 32768, 8, 128), (1, 65536, 16, 128), (2, 16384, 8, 128)]
CHUNK = 64


def ceilings() -> tuple[float, float]:
    """Measured device-to-device copy bandwidth (TB/s, read + write) and bf16 8192^3 matmul rate (TFLOP/s)."""
    x = torch.randn(2**28, device="cuda", dtype=torch.float32)  # 1 GiB
    y = torch.empty_like(x)
    copy_ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mm_ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    return 2 * x.numel() * 4 / copy_ms / 1e9, 2 * 8192**3 / mm_ms / 1e9


def chunk_flops(B: int, T: int, H: int, D: int) -> float:
    """Forward FLOPs of the chunkwise algorithm: per token 2 (3 C K + 2 C V + 3 K V) with K = V = D (K K^T, W, Q K^T;
    U0, tril(Q K^T) u; W S, K^T u, Q S); the 64 x 64 triangular inverse is left out."""
    return 2 * B * T * H * (5 * CHUNK * D + 3 * D * D)


def inputs(B: int, T: int, H: int, D: int, gated: bool = False):
    """q, k, v, beta in bf16 (k L2-normalised) and, if gated, the float32 log decay g."""
    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    k = F.normalize(torch.randn(B, T, H, D, device="cuda", dtype=torch.float32), dim=-1).to(torch.bfloat16)
    v = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    beta = torch.randn(B, T, H, device="cuda", dtype=torch.bfloat16).sigmoid()
    g = [F.logsigmoid(torch.randn(B, T, H, device="cuda")) / 16] if gated else []
    return [x.requires_grad_() for x in (q, k, v, beta, *g)]


def implementations(gated: bool = False):
    """name -> f(q, k, v, beta[, g]) returning o; each a bf16 operator with gradients. The first is the baseline,
    the second ours in mode efla, the fourth EFLA through fla (the accuracy check)."""
    def ours(mode):
        return lambda *a: efla_attention(*a[:4], g=a[4] if gated else None, mode=mode, backend="triton",
                                         check_beta=False)[0]

    def via_fla(*a):
        return efla_attention(*a[:4], g=a[4] if gated else None, backend="fla", check_beta=False)[0]

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # q, k, v given as [B, H, T, D], no beta

    if gated:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        time_fla_gated_backward_anyway()
        return {
            "fla Gated DeltaNet": lambda q, k, v, beta, g: chunk_gated_delta_rule(q, k, v, g, beta)[0],
            "ours gated efla": ours("efla"),
            "ours gated delta": ours("delta"),
            "gated EFLA via fla": via_fla,
            "SDPA causal": sdpa,
        }
    from fla.ops.delta_rule import chunk_delta_rule

    return {
        "fla DeltaNet": lambda q, k, v, beta: chunk_delta_rule(q, k, v, beta)[0],
        "ours efla": ours("efla"),
        "ours delta": ours("delta"),
        "EFLA via fla": via_fla,
        "SDPA causal": sdpa,
    }


def measure(f, args, do):
    """Median forward ms, forward+backward ms, and peak MiB of forward+backward above what is allocated now."""
    fwd = triton.testing.do_bench(lambda: f(*args), return_mode="median")

    def step():
        f(*args).backward(do)

    both = triton.testing.do_bench(step, grad_to_none=args, return_mode="median")
    for x in args:
        x.grad = None  # the peak then includes the input gradients, as in training
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return fwd, both, (torch.cuda.max_memory_allocated() - base) / 2**20


def profile(B, T, H, D, impls, gated, writer):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    args = inputs(B, T, H, D, gated)
    baseline, ours_efla, ours_delta = list(impls)[:3]
    for name in (ours_efla, ours_delta, baseline):  # ours in both modes (the gap between them is the step size's cost)
        f = impls[name]
        do = torch.randn_like(args[2])
        for _ in range(3):
            f(*args).backward(do)
        for x in args:
            x.grad = None  # else the profile shows the gradients' accumulation, four elementwise adds
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            f(*args).backward(do)
            torch.cuda.synchronize()
        print(f"\n{name}, one forward+backward at {(B, T, H, D)}:")
        print(prof.key_averages().table(sort_by="device_time_total", row_limit=12, max_name_column_width=60))
        for event in prof.key_averages():
            if event.self_device_time_total > 0:
                writer.write(kind="profile", shape=f"{B}x{T}x{H}x{D}", impl=name, stage=event.key,
                             us=event.self_device_time_total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--shapes", nargs="*", default=None, help="B,T,H,D for each shape (default: the issue's)")
    parser.add_argument("--profile", nargs="*", type=int, default=None, metavar="INDEX",
                        help="per-kernel times at these shapes (indices into --shapes; none given: the first)")
    parser.add_argument("--gated", action="store_true", help="the decay-gated forms (against chunk_gated_delta_rule)")
    parser.add_argument("--out", type=Path, default=None, help="JSON-lines file the rows are appended to")
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    torch.manual_seed(0)
    bandwidth, matmul = ceilings()
    impls = implementations(args.gated)
    baseline, ours_efla, _, via_fla = list(impls)[:4]
    writer = ResultsWriter("kernels", torch.cuda.get_device_name(), args.out, gated=args.gated,
                           copy_tbs=round(bandwidth, 2), matmul_tflops=round(matmul))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{datetime.date.today()}; ceilings measured now: copy {bandwidth:.2f} TB/s, bf16 matmul {matmul:.0f} "
          f"TFLOP/s; medians of triton.testing.do_bench; ratios against {baseline} of the same shape", flush=True)
    head = ("B x T x H x D", "impl", "fwd ms", "fwd x", "fwd+bwd ms", "f+b x", "fwd TB/s", "%bw", "fwd TFLOP/s",
            "%mm", "peak MiB", "mem x", "rel err vs fla")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head), flush=True)
    for B, T, H, D in shapes:
        operands = inputs(B, T, H, D, args.gated)
        q, k, v = operands[:3]
        with torch.no_grad():
            o_ours = impls[ours_efla](*operands).float()
            o_fla = impls[via_fla](*operands).float()
        agreement = ((o_ours - o_fla).norm() / o_fla.norm()).item()
        base = None
        for name, f in impls.items():
            sdpa = name.startswith("SDPA")
            call_args = [x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v)] if sdpa \
                else operands
            do = torch.randn_like(call_args[2])
            fwd, both, peak = measure(f, call_args, do)
            if base is None:
                base = (fwd, both, peak)
            tbs = ((4 * D + 1) * 2 + 4 * args.gated) * B * T * H / fwd / 1e9  # q, k, v, o, beta once (bf16), g
            tflops = (2 * B * H * T * T * D if sdpa else chunk_flops(B, T, H, D)) / fwd / 1e9  # causal: half of 4BHT^2D
            err = f"{agreement:.1e}" if name == ours_efla else ""
            print(f"| {B}x{T}x{H}x{D} | {name} | {fwd:.3f} | {fwd / base[0]:.2f} | {both:.3f} | {both / base[1]:.2f} "
                  f"| {tbs:.2f} | {100 * tbs / bandwidth:.0f} | {tflops:.0f} | {100 * tflops / matmul:.0f} "
                  f"| {peak:.0f} | {peak / base[2]:.2f} | {err} |", flush=True)
            writer.write(shape=f"{B}x{T}x{H}x{D}", impl=name, fwd_ms=fwd, fwd_bwd_ms=both, peak_mib=peak,
                         **({"rel_err_vs_fla": agreement} if name == ours_efla else {}))
            del call_args
        del q, k, v, operands
    if args.profile is not None:
        for index in args.profile or [0]:
            profile(*shapes[index], impls, args.gated, writer)


if __name__ == "__main__":
    main()
