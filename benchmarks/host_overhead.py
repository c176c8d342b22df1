"""Host time per call of the model's GPU operators, at shapes so small that the GPU waits on the CPU.

    python benchmarks/host_overhead.py [--calls 300] [--out FILE]

An eager training step at small batches can be bound by the host (BENCHMARKS.md, "Host overhead"): the Python side
of each operator call, not the kernels, sets the pace. This script times that side alone. Per
operator it issues ``--calls`` calls back to back on tiny inputs and reports the wall time per call (the host's
issue time: the kernels of one call take a few microseconds, so the CPU never waits for the GPU) and the GPU's busy
time per call (its kernels' own time, from the profiler); "host" marks rows whose host time exceeds their GPU time.
Operators: ours (efla_attention's chunk pipeline forward and forward+backward, the short convolution, RMSNorm,
SwiGLU, the q/k L2 norm) beside fla's chunk_delta_rule when fla is installed, a bare Triton kernel with 4 and with
24 arguments (Triton's own launch cost and what each argument adds) and one small torch.mm (an aten launch).
"""

from __future__ import annotations

import argparse
import datetime
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton
import triton.language as tl
from results_io import ResultsWriter

from efla import efla_attention
from efla.modules.elementwise import l2_normalize, rms_norm, swiglu
from efla.modules.triton.short_conv import short_conv_silu, short_conv_silu_split


@triton.jit
def _touch4(x, n, a, b):
    """Writes one value: a kernel whose launch is all its cost."""
    if tl.program_id(0) == 0:
        tl.store(x, n + a + b)


@triton.jit
def _touch24(x, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, n1, n2, n3, n4, n5, n6, n7, n8,
             C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr, C4: tl.constexpr):
    """The same with as many arguments as our chunk kernels take (pointers, ints and constexprs)."""
    if tl.program_id(0) == 0:
        tl.store(x, n1 + n8 + C1 + C4)


def _operators(with_fla: bool) -> dict[str, Callable[[], object]]:
    """Name -> a zero-argument call of one operator on tiny bf16 inputs (fresh random values)."""
    dev, bf16 = "cuda", torch.bfloat16
    B, T, H, D = 1, 128, 2, 64  # T > 64: the chunk pipeline, not the fused recurrent kernel
    q, k, v = (torch.randn(B, T, H, D, device=dev, dtype=bf16, requires_grad=True) for _ in range(3))
    beta = torch.rand(B, T, H, device=dev, dtype=bf16, requires_grad=True)
    do = torch.randn(B, T, H, D, device=dev, dtype=bf16)
    x = torch.randn(1, T, 256, device=dev, dtype=bf16, requires_grad=True)
    conv_w = torch.randn(256, 1, 4, device=dev, dtype=bf16, requires_grad=True)
    norm_w = torch.ones(256, device=dev, dtype=bf16, requires_grad=True)
    gate_up = torch.randn(T, 512, device=dev, dtype=bf16, requires_grad=True)
    x3 = torch.randn(1, T, 3 * 256, device=dev, dtype=bf16, requires_grad=True)
    conv_w3 = torch.randn(3 * 256, 1, 4, device=dev, dtype=bf16, requires_grad=True)
    m1, m2 = torch.randn(64, 64, device=dev, dtype=bf16), torch.randn(64, 64, device=dev, dtype=bf16)
    out = torch.empty(1, device=dev, dtype=torch.float32)

    def backward(y: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> None:
        torch.autograd.grad(y, inputs, torch.ones_like(y))

    def attention(mode: str) -> torch.Tensor:
        return efla_attention(q, k, v, beta, mode=mode, backend="triton", check_beta=False)[0]

    ops: dict[str, Callable[[], object]] = {
        "efla_attention fwd": lambda: attention("efla"),
        "efla_attention fwd+bwd": lambda: torch.autograd.grad(attention("efla"), (q, k, v, beta), do),
        "short conv + SiLU fwd": lambda: short_conv_silu(x, conv_w, None),
        "short conv + SiLU fwd+bwd": lambda: backward(short_conv_silu(x, conv_w, None), (x, conv_w)),
        "short conv q, k, v: 3 calls fwd+bwd": lambda: [backward(short_conv_silu(x, conv_w, None), (x, conv_w))
                                                       for _ in range(3)],
        "short conv q, k, v: 1 call fwd+bwd": lambda: torch.autograd.grad(
            short_conv_silu_split(x3, conv_w3, 3, None), (x3, conv_w3), [torch.ones_like(x)] * 3),
        "RMSNorm fwd+bwd": lambda: backward(rms_norm(x, norm_w, 1e-6), (x, norm_w)),
        "SwiGLU fwd+bwd": lambda: backward(swiglu(gate_up), (gate_up,)),
        "L2 norm fwd+bwd": lambda: backward(l2_normalize(x), (x,)),
        "Triton kernel, 4 arguments": lambda: _touch4[(1,)](out, 1, 2, 3),
        "Triton kernel, 24 arguments": lambda: _touch24[(1,)](out, *([out] * 11), *range(8), C1=1, C2=2, C3=3,
                                                             C4=4),
        "torch.mm 64 x 64": lambda: m1 @ m2,
    }
    if with_fla:
        from fla.ops.delta_rule import chunk_delta_rule

        def fla_attention() -> torch.Tensor:
            return chunk_delta_rule(q, k, v, beta)[0]

        ops["fla chunk_delta_rule fwd"] = fla_attention
        ops["fla chunk_delta_rule fwd+bwd"] = lambda: torch.autograd.grad(fla_attention(), (q, k, v, beta), do)
    return ops


def measure(call: Callable[[], object], calls: int) -> dict[str, float]:
    """Host microseconds per call (wall time of issuing ``calls`` calls back to back, no sync between them) and the
    GPU's busy microseconds per call (the kernels' own time, summed by the profiler over a second pass of the same
    calls), after 20 untimed calls (compilation, autotuning, the allocator's first blocks)."""
    for _ in range(20):
        call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    host_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    busy_us = sum(event.self_device_time_total for event in prof.key_averages())
    return {"host_us": host_s / calls * 1e6, "gpu_us": busy_us / calls}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--calls", type=int, default=300, help="timed calls per operator")
    parser.add_argument("--out", type=Path, default=None, help="JSON-lines file the rows are appended to "
                        "(default: a new dated file in benchmarks/results/)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: it times the host side of GPU operator calls")
    if args.calls < 1:
        parser.error(f"--calls must be >= 1 (got {args.calls})")
    try:
        import fla  # noqa: F401

        with_fla = True
    except ImportError:
        with_fla = False
    writer = ResultsWriter("host_overhead", torch.cuda.get_device_name(), args.out, calls=args.calls)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{datetime.date.today()}; {args.calls} calls per operator", flush=True)
    rows = []
    for name, call in _operators(with_fla).items():
        row = writer.write(operator=name, **measure(call, args.calls))
        rows.append(row)
        print(f"{name:36s} host {row['host_us']:8.1f} us  gpu {row['gpu_us']:8.1f} us", flush=True)
    print("\n| operator | host us per call | GPU us per call | bound by |")
    print("|---|---|---|---|")
    for row in rows:
        bound = "host" if row["host_us"] > row["gpu_us"] else "GPU"
        print(f"| {row['operator']} | {row['host_us']:.1f} | {row['gpu_us']:.1f} | {bound} |")


if __name__ == "__main__":
    main()
