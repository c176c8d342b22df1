"""What many test modules share: the project's error measure, random operator inputs and what a forward keeps for
its backward."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Any

import pytest
import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, computed in float64 on out's device (a CPU reference may check GPU output): the
    project's one error measure."""
    ref = ref.double().to(out.device)
    return ((out.double() - ref).norm() / ref.norm()).item()


def random_inputs(B: int, T: int, H: int, K: int, V: int, dtype: torch.dtype = torch.float64, key_scale: float = 1.0,
                  decay_scale: float = 2.0, seed: int | None = None, requires_grad: bool = False):
    """Fresh random q, k [B, T, H, K], v [B, T, H, V], beta in [0, 2), log decay g in (-decay_scale, 0] and an
    initial state [B, H, K, V], from ``seed`` (or a seed drawn from torch's global generator); leaves that require
    grad if asked."""
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.randint(0, 2**31, ()).item())
    q = torch.randn(B, T, H, K, generator=gen, dtype=dtype)
    k = torch.randn(B, T, H, K, generator=gen, dtype=dtype) * key_scale
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    beta = torch.rand(B, T, H, generator=gen, dtype=dtype) * 2
    g = -torch.rand(B, T, H, generator=gen, dtype=dtype) * decay_scale
    h0 = torch.randn(B, H, K, V, generator=gen, dtype=dtype)
    return tuple(x.requires_grad_(requires_grad) for x in (q, k, v, beta, g, h0))


def require_triton_kernels() -> str:
    """Skip the calling test module unless efla's Triton kernels can run here, and return the device they run on:
    "cuda", or "cpu" in Triton's interpreter, which must be switched on (TRITON_INTERPRET=1, as tests/conftest.py
    does) before triton is first imported; once triton has loaded its GPU library the interpreter cannot run."""
    if torch.cuda.is_available():
        pytest.importorskip("triton")
        return "cuda"
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("on CPU run the suite as `TRITON_INTERPRET=1 pytest` (set before triton is imported)",
                    allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton")
    return "cpu"


def kept_for_backward(fn: Callable[[], Any]) -> tuple[Any, dict[int, torch.Tensor]]:
    """fn() and the tensors its forward keeps for the backward, one per storage, keyed by the storage's address."""
    kept: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept[tensor.untyped_storage().data_ptr()] = tensor
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, kept


def storage_bytes(tensors: dict[int, torch.Tensor], excluded: AbstractSet[int] = frozenset()) -> int:
    """Bytes of the storages of ``kept_for_backward``'s tensors, but for those at the addresses ``excluded``."""
    return sum(t.untyped_storage().nbytes() for address, t in tensors.items() if address not in excluded)
