"""CPU speed of the PyTorch backends: forward+backward on the sequential-MNIST shape, recurrent vs chunkwise.

    python benchmarks/cpu_backends.py [--batch 128 --length 784 --dim 64 --repeats 5]

Prints the median wall time of each backend (fresh random inputs, one warm-up), their ratio, and the cost of the
argument checks, as a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date

import torch

from efla import efla_attention
from efla.ops.checks import check_inputs


def _inputs(batch: int, length: int, dim: int) -> tuple[torch.Tensor, ...]:
    q, k, v = (torch.randn(batch, length, 1, dim, requires_grad=True) for _ in range(3))
    beta = torch.rand(batch, length, 1).requires_grad_()
    return q, k, v, beta


def _fwd_bwd_seconds(backend: str, batch: int, length: int, dim: int, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        q, k, v, beta = _inputs(batch, length, dim)
        start = time.perf_counter()
        o, _ = efla_attention(q, k, v, beta, backend=backend)
        o.square().mean().backward()
        if i:  # the first run warms up allocators and kernels
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _check_microseconds(batch: int, length: int, dim: int) -> float:
    q, k, v, beta = _inputs(batch, length, dim)
    runs = 2000
    start = time.perf_counter()
    for _ in range(runs):
        check_inputs(q, k, v, beta, None, None, "efla", "torch", 64)
    return (time.perf_counter() - start) / runs * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--length", type=int, default=784)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    shape = (args.batch, args.length, args.dim)
    chunk = _fwd_bwd_seconds("torch", *shape, args.repeats)
    recurrent = _fwd_bwd_seconds("recurrent", *shape, max(1, args.repeats // 2))
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__},"
          f" {date.today()}; B={args.batch} T={args.length} H=1 K=V={args.dim} float32, forward+backward, median")
    print("| backend | seconds | speed-up vs recurrent |")
    print("|---|---|---|")
    print(f"| recurrent | {recurrent:.3f} | 1.0x |")
    print(f"| torch (chunkwise, C=64) | {chunk:.3f} | {recurrent / chunk:.1f}x |")
    print(f"argument checks: {_check_microseconds(*shape):.1f} us per call")


if __name__ == "__main__":
    main()
