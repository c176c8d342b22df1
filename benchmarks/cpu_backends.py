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


def _fwd_bwd_seconds(backend: str, chunk_size: int, batch: int, length: int, dim: int) -> float:
    q, k, v, beta = _inputs(batch, length, dim)
    start = time.perf_counter()
    o, _ = efla_attention(q, k, v, beta, backend=backend, chunk_size=chunk_size)
    o.square().mean().backward()
    return time.perf_counter() - start


def _check_microseconds(batch: int, length: int, dim: int) -> float:
    q, k, v, beta = _inputs(batch, length, dim)
    runs = 2000
    start = time.perf_counter()
    for _ in range(runs):
        check_inputs(q, k, v, beta, None, None, "efla", "torch", 64)
    return (time.perf_counter() - start) / runs * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--length", type=int, default=784)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    shape = (args.batch, args.length, args.dim)
    variants = {"recurrent": ("recurrent", 64), "torch (chunkwise, chunk_size=64, the default)": ("torch", 64),
                "torch (chunkwise, chunk_size=32)": ("torch", 32)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.repeats + 1):  # interleaved, so every variant sees the same machine; round 0 warms up
        for name, (backend, chunk_size) in variants.items():
            seconds = _fwd_bwd_seconds(backend, chunk_size, *shape)
            if round_:
                times[name].append(seconds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__},"
          f" {date.today()}; B={args.batch} T={args.length} H=1 K=V={args.dim} float32, forward+backward, median of"
          f" {args.repeats} interleaved rounds")
    print("| backend | seconds | speed-up vs recurrent |")
    print("|---|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.3f} | {medians['recurrent'] / seconds:.1f}x |")
    print(f"argument checks: {_check_microseconds(*shape):.1f} us per call")


if __name__ == "__main__":
    main()
