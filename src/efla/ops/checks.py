"""Argument checks for ``efla_attention``: clear errors that name the argument and say what to change.

Shape, dtype and device checks read metadata only (no device sync). The two checks that read values (beta >= 0,
cu_seqlens well formed) are separate so that callers who guarantee them can skip the host-device sync.
"""

from __future__ import annotations

import itertools

import torch

MODES = ("efla", "delta")
BACKENDS = ("auto", "recurrent", "torch", "triton", "fla")


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    mode: str,
    backend: str,
    chunk_size: int,
    scale: float | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
) -> None:
    """Raise ValueError/TypeError naming the offending argument; metadata only."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} (got {mode!r})")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (got {backend!r})")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (got {chunk_size!r})")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a number (got {type(scale).__name__} {scale!r}); leave it None for K ** -0.5")
    for name, x in (("initial_state", initial_state), ("cu_seqlens", cu_seqlens), ("cu_seqlens_cpu", cu_seqlens_cpu)):
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None (got {type(x).__name__}); wrap it with "
                            f"torch.tensor(..., device=q.device)")
    if cu_seqlens_cpu is not None and (cu_seqlens is None or cu_seqlens_cpu.shape != cu_seqlens.shape):
        raise ValueError("cu_seqlens_cpu must be a host copy of cu_seqlens (same shape); pass cu_seqlens too")
    for name, x, ndim, layout in (("q", q, 4, "[B, T, H, K]"), ("k", k, 4, "[B, T, H, K]"),
                                  ("v", v, 4, "[B, T, H, V]"), ("beta", beta, 3, "[B, T, H]")):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (got {type(x).__name__})")
        if x.dim() != ndim:
            raise ValueError(f"{name} must be {layout} ({ndim} dims), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor (got {x.dtype})")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)} [B, T, H, K], got {tuple(k.shape)}")
    B, T, H, K = q.shape
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V] like q, got {tuple(v.shape)}")
    if beta.shape != (B, T, H):
        raise ValueError(f"beta must be [B, T, H] = [{B}, {T}, {H}], got {tuple(beta.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype (got q {q.dtype}, k {k.dtype}, v {v.dtype})")
    N = B
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor (got {cu_seqlens.dtype}, "
                             f"shape {tuple(cu_seqlens.shape)})")
        if cu_seqlens.device != q.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
        if B != 1:
            raise ValueError(f"with cu_seqlens the sequences are packed along T, so B must be 1 (got B={B})")
        if cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must hold at least [0, T] (got fewer than 2 entries)")
        N = cu_seqlens.numel() - 1
    if initial_state is not None:
        expected = (N, H, K, v.shape[-1])
        if initial_state.shape != expected:
            what = "number of sequences" if cu_seqlens is not None else "batch size"
            raise ValueError(f"initial_state must be [N, H, K, V] = {list(expected)} (N = {what}), "
                             f"got {list(initial_state.shape)}")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state is on {initial_state.device} but q is on {q.device}")
        if not initial_state.is_floating_point():
            raise TypeError(f"initial_state must be floating point (got {initial_state.dtype})")


def check_decay(g: torch.Tensor, beta: torch.Tensor) -> None:
    """The decay gate g: a floating [B, T, H] tensor like beta, on beta's device; metadata only."""
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"g must be a torch.Tensor or None (got {type(g).__name__})")
    if g.shape != beta.shape:
        raise ValueError(f"g must be [B, T, H] = {list(beta.shape)} like beta, got {list(g.shape)}")
    if not g.is_floating_point():
        raise TypeError(f"g must be a floating-point tensor (got {g.dtype})")
    if g.device != beta.device:
        raise ValueError(f"g is on {g.device} but q is on {beta.device}")


def check_decay_values(g: torch.Tensor) -> None:
    """g <= 0 (a log decay: g > 0 would grow the state) and no NaN. Syncs with the device."""
    high = g.max() if g.numel() else None
    if high is not None and bool(high > 0):
        raise ValueError(f"g is a log decay and must be <= 0 (got max {high.item():.4g})")
    if high is not None and bool(torch.isnan(high)):
        raise ValueError("g contains NaN")


def check_values(beta: torch.Tensor, mode: str = "efla") -> None:
    """beta >= 0 and not NaN (a negative duration runs the ODE backwards and the state can blow up); finite too in
    mode "delta", whose Euler step has no limit for beta -> inf (EFLA's has: the projection onto k's complement).
    Syncs with the device: ``efla_attention`` calls ``assert_values`` on GPUs instead."""
    if not beta.numel():
        return
    low = beta.min()
    if bool(torch.isnan(low)) or bool(torch.isnan(beta).any()):
        raise ValueError("beta contains NaN")
    if bool(low < 0):
        raise ValueError(f"beta must be >= 0 (got min {low.item():.4g})")
    if mode == "delta" and bool(torch.isinf(beta).any()):
        raise ValueError("beta must be finite in mode 'delta' (got inf)")


def assert_values(beta: torch.Tensor, mode: str = "efla", g: torch.Tensor | None = None) -> None:
    """``check_values`` (and ``check_decay_values`` for g) without waiting for the device: on a GPU (and inside
    torch.compile) a device-side assert (the process stops with "device-side assert triggered" when a value is
    invalid); eagerly on the CPU, the checks themselves."""
    if not beta.is_cuda and not torch.compiler.is_compiling():
        check_values(beta, mode)
        if g is not None:
            check_decay_values(g)
        return
    valid = (beta >= 0) if mode == "efla" else (beta >= 0) & (beta < float("inf"))
    torch._assert_async(valid.all(), "efla_attention: beta must be >= 0, not NaN (and finite in mode 'delta')")
    if g is not None:
        torch._assert_async((g <= 0).all(), "efla_attention: g must be <= 0 and not NaN")


def sequence_lengths(cu_seqlens: torch.Tensor, total: int) -> list[int]:
    """Per-sequence lengths from cumulative offsets, checking they start at 0, end at T and never decrease."""
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={total} (got {offsets[0]} ... {offsets[-1]})")
    lengths = [b - a for a, b in itertools.pairwise(offsets)]
    if min(lengths) < 0:
        raise ValueError(f"cu_seqlens must be non-decreasing (got {offsets})")
    return lengths
