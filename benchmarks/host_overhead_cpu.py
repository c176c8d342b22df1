"""Host time of the Triton operators' call paths on a machine without a GPU: every kernel launch replaced by a no-op.

    python benchmarks/host_overhead_cpu.py [--calls 100] [--repeats 7]

What ``host_overhead.py`` measures on a GPU machine (the Python side of each call, which the GPU waits for when the
host is the slower of the two), here with the kernels stubbed out under TRITON_INTERPRET=1, so that a change to the
call path can be timed on a laptop: efla_attention forward and forward+backward, ungated and gated, bf16 inputs of
2 x 1024 x 4 x 128, and the short convolution of a layer's q, k and v (one call, 3 x 512 channels) forward and
forward+backward (the kernels do not run, so the shapes only set the tensors' metadata). Prints the median over
--repeats of the mean over --calls calls, in microseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: CPU tensors pass the backend's device check

import torch
import torch.nn.functional as F

from efla import efla_attention
from efla.commands import INTERRUPTED
from efla.modules.triton import short_conv
from efla.ops.triton import chunk_bwd, chunk_fwd, fused_recurrent, wy


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_kernels() -> None:
    for module in (wy, chunk_fwd, chunk_bwd, fused_recurrent, short_conv):
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel"):
                setattr(module, name, _NoLaunch())


def host_us(call, calls: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean host time of ``calls`` calls, in us."""
    for _ in range(10):
        call()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.calls < 1 or args.repeats < 1:
        parser.error("--calls and --repeats must be >= 1")
    stub_kernels()
    B, T, H, D = 2, 1024, 4, 128
    q, v = (torch.randn(B, T, H, D, dtype=torch.bfloat16) for _ in range(2))
    k = F.normalize(torch.randn(B, T, H, D), dim=-1).bfloat16()
    beta = torch.rand(B, T, H, dtype=torch.bfloat16)
    g = F.logsigmoid(torch.randn(B, T, H)) / 16
    inputs = [x.requires_grad_() for x in (q, k, v, beta, g)]
    do = torch.randn_like(v)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; host us per call, kernels stubbed")
    for gated in (False, True):
        used = inputs if gated else inputs[:4]

        def forward(used=used, gated=gated):
            return efla_attention(*used[:4], g=used[4] if gated else None, backend="triton", check_beta=False)[0]

        def forward_backward(used=used, forward=forward):
            torch.autograd.grad(forward(), used, do)

        for name, call in (("forward", forward), ("forward+backward", forward_backward)):
            print(f"attention {'gated' if gated else 'ungated'} {name}: "
                  f"{host_us(call, args.calls, args.repeats):.1f} us")
    x = torch.randn(B, T, 3 * 512, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(3 * 512, 1, 4, dtype=torch.bfloat16, requires_grad=True)
    dys = [torch.randn(B, T, 512, dtype=torch.bfloat16) for _ in range(3)]

    def conv_forward():
        return short_conv.short_conv_silu_split(x, weight, 3, None)

    def conv_forward_backward():
        torch.autograd.grad(conv_forward(), (x, weight), dys)

    for name, call in (("forward", conv_forward), ("forward+backward", conv_forward_backward)):
        print(f"short convolution {name}: {host_us(call, args.calls, args.repeats):.1f} us")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the rows printed so far stand; no traceback
        print("host_overhead_cpu: interrupted", file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None
