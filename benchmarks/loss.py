"""The language-modelling loss on the GPU: our chunked linear + cross-entropy (fused kernel and PyTorch path) against
the plain all-logits computation and fla's fused cross-entropy on full logits (what fla's models run by default).

    python benchmarks/loss.py [--tokens 16384 32768] [--hidden 1024] [--vocab 32000] [--out FILE]

For bf16 hidden states [tokens, hidden] and an lm_head weight [vocab, hidden] it times, with
``triton.testing.do_bench`` medians, loss + backward of each implementation, its peak memory above the inputs, and
its loss and gradients' relative error against the plain computation in float32 logits. Each row is printed (and
appended to --out as a JSON line; default: a new dated file in benchmarks/results/) as soon as it is measured.
"""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import triton
from results_io import ResultsWriter

import efla.models.loss as loss_module
from efla.models.loss import linear_cross_entropy, linear_cross_entropy_reference


def _ours(fused: bool) -> Callable:
    """linear_cross_entropy as a CUDA user gets it (fused) or through its PyTorch path (the one CPUs take)."""
    def run(hidden, weight, targets):
        if fused:
            return linear_cross_entropy(hidden, weight, targets)
        with mock.patch.object(loss_module, "_fused", lambda x: False):
            return linear_cross_entropy(hidden, weight, targets)
    return run


def _fla() -> Callable | None:
    try:
        from fla.modules import FusedCrossEntropyLoss
    except ImportError:
        return None
    criterion = FusedCrossEntropyLoss(reduction="sum")
    return lambda hidden, weight, targets: criterion(hidden @ weight.t(), targets)


def implementations() -> dict[str, Callable]:
    impls = {"plain (float32 logits)": linear_cross_entropy_reference, "ours fused": _ours(True),
             "ours PyTorch path": _ours(False)}
    fla = _fla()
    if fla is not None:
        impls["fla FusedCrossEntropyLoss"] = fla
    return impls


def measure(f: Callable, args: list[torch.Tensor]) -> tuple[float, float, list[torch.Tensor]]:
    """Median ms of loss + backward, peak MiB above what is allocated now, and (loss, grad hidden, grad weight)."""
    def step():
        f(*args).backward()

    ms = triton.testing.do_bench(step, grad_to_none=args[:2], return_mode="median")
    for x in args[:2]:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = f(*args)
    loss.backward()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    results = [loss.detach().float(), args[0].grad.float(), args[1].grad.float()]
    for x in args[:2]:
        x.grad = None
    return ms, peak, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--tokens", nargs="+", type=int, default=[16384, 32768])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--out", type=Path, default=None, help="JSON-lines file the rows are appended to")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    writer = ResultsWriter("loss", torch.cuda.get_device_name(), args.out, hidden=args.hidden, vocab=args.vocab)
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{datetime.date.today()}; bf16, hidden {args.hidden}, vocab {args.vocab}; loss summed over the tokens")
    print("| tokens | impl | loss+backward ms | peak MiB | rel err loss | rel err grad h | rel err grad W |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for tokens in args.tokens:
        hidden = torch.randn(tokens, args.hidden, device="cuda", dtype=torch.bfloat16).requires_grad_()
        weight = (torch.randn(args.vocab, args.hidden, device="cuda") / args.hidden**0.5).bfloat16().requires_grad_()
        targets = torch.randint(0, args.vocab, (tokens,), device="cuda")
        targets[torch.rand(tokens, device="cuda") < 0.05] = -100
        reference = None
        for name, f in implementations().items():
            ms, peak, results = measure(f, [hidden, weight, targets])
            reference = reference or results
            errors = [((x - r).norm() / r.norm()).item() for x, r in zip(results, reference, strict=True)]
            print(f"| {tokens} | {name} | {ms:.2f} | {peak:.0f} | {errors[0]:.1e} | {errors[1]:.1e} | "
                  f"{errors[2]:.1e} |", flush=True)
            writer.write(tokens=tokens, impl=name, ms=ms, peak_mib=peak, rel_err=errors)


if __name__ == "__main__":
    main()
