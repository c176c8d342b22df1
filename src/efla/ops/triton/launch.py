"""Launch settings of the Triton kernels: V-block width, warps and software-pipeline stages, per kernel and head dims.

The defaults below are chosen by hand (the comments say why); ``benchmarks/tune_kernels.py`` sweeps alternatives on
the GPU at hand, checking each against the defaults' results. ``OVERRIDES`` replaces the default of a kernel for
every call: that script sets it to try candidates, and a user on another GPU can do the same without editing code.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Launch:
    """How one kernel is launched: its V-block (columns of V per program or per loop step), warps, stages."""

    bv: int
    warps: int
    stages: int


KERNELS = ("wy_fwd", "state_fwd", "out", "state_bwd", "grad_qk", "grad_wy")
OVERRIDES: dict[str, Launch] = {}
SAVE_T = True
"""Whether the training forward keeps T (64 values per token and head, input dtype) for the backward, whose kernels
then load it instead of inverting the triangular system twice more."""


GATED_BF16 = {
    64: {"state_bwd": Launch(64, 4, 3), "grad_qk": Launch(64, 4, 1), "grad_wy": Launch(32, 4, 2)},
    128: {"state_bwd": Launch(32, 4, 2), "grad_qk": Launch(64, 8, 1), "grad_wy": Launch(32, 4, 2)},
}
"""The gated backward's settings at 16-bit K = V = D, by D: the winners of tune_kernels.py --gated on an H200, us per
forward+backward. D = 64 at 8 x 4096 x 32 heads (2026-12-03): state_bwd 256 -> 245, grad_qk 1182 -> 588, grad_wy
1550 -> 780. D = 128 at 8 x 4096 x 16 heads (2026-12-03): state_bwd 751 -> 472, grad_qk 747 -> 703, grad_wy 1014 ->
678 (the three forward kernels' defaults were within 5 % of their best). With the decay gate's extra tiles the passes
run faster on fewer warps or narrower V-blocks than the ungated settings. Other gated head dims keep the ungated
settings until they are tuned."""


def _default(kernel: str, K: int, V: int, dtype_bytes: int, gated: bool = False) -> Launch:
    if gated and dtype_bytes == 2 and K == V and kernel in GATED_BF16.get(K, {}):
        return GATED_BF16[K][kernel]
    if kernel in ("state_fwd", "state_bwd"):
        # split V for parallelism and keep S [K, BV] in registers; load the next chunk's tiles during this one's
        # (two stages) unless float32 K = 256 tiles overflow shared memory. Triton 3.6 on Hopper miscompiled these
        # loops with 4 warps, one stage and a V-block of 16 or 32 (wrong results and illegal addresses on an H200),
        # so K = 256 gets 8 warps, or with a V-block of 16 (V = 16) the 2 warps that ran correctly there.
        bv = min(V, 64 if K <= 128 else 32)
        warps = 4 if K <= 128 else (2 if bv <= 16 else 8)
        if kernel == "state_bwd" and not gated and dtype_bytes == 2 and K == 128 and V >= 64:
            # tune_kernels.py, bf16 8 x 4096 x 16 x 128, H200: 397 -> 350 us (2026-12-02); not yet run gated
            return Launch(64, 8, 3)
        return Launch(bv, warps, 2 if K <= 128 or dtype_bytes == 2 else 1)
    # K = 16 gave wrong outputs with 4-8 warps (H200, Triton 3.6) and 2 warps fixed it; V = 16 is treated alike
    small = K <= 16 or V <= 16
    # 16-bit inputs with K, V <= 128: the winners of benchmarks/tune_kernels.py at bf16 K = V = 128 on an H200
    # (2026-11-30; per forward+backward: out 363 -> 236 us, grad_wy 1048 -> 818 us, grad_qk 423 -> 398 us)
    tuned = dtype_bytes == 2 and not small and K <= 128 and V <= 128
    if kernel == "wy_fwd":
        return Launch(min(V, 128), 4, 2) if tuned else Launch(min(V, 64), 2 if small else 4, 3)
    if kernel == "out":
        return Launch(min(V, 128), 4, 2) if tuned else Launch(min(V, 128 if K <= 128 else 64), 2 if small else 8, 3)
    if kernel in ("grad_qk", "grad_wy"):
        return Launch(min(V, 64), 2 if small else 8, 2 if tuned else 1)
    raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")


def output_in_state_pass(K: int, V: int, dtype_bytes: int, sequences_x_heads: int) -> bool:
    """Whether the forward forms its output inside the state pass (no h or u stored, no output pass): at K <= 64,
    where the output pass costs as much as the state pass, when the state pass's programs cover the
    multiprocessors. On an H200, gated bf16 (2026-12-03): 8 x 4096 x 32 x 64 (256 programs) forward 1.006 ->
    0.868 ms; at 1 x 32768 x 16 x 64 (64 programs) the longer sequential chain lost, 0.877 -> 1.535 ms, and at
    K = 128 too, 0.902 -> 0.994 ms at 8 x 4096 x 16 heads."""
    if K > 64:  # first: this runs on every forward call's host path
        return False
    return sequences_x_heads * -(-V // launch("state_fwd", K, V, dtype_bytes).bv) >= _multiprocessors()


def launch(kernel: str, K: int, V: int, dtype_bytes: int, sequences_x_heads: int | None = None,
           gated: bool = False) -> Launch:
    """The settings ``kernel`` runs with for head dims K, V and inputs of ``dtype_bytes`` bytes per element (``gated``:
    the decay-gated form): ``OVERRIDES[kernel]`` if set (its V-block capped at V), else the default. For the state
    passes, which run one program per (sequence, head, V-block), ``sequences_x_heads`` lets a launch with fewer
    programs than the GPU has multiprocessors (long context at small batch) split V finer."""
    chosen = OVERRIDES.get(kernel) or _default(kernel, K, V, dtype_bytes, gated)
    if kernel in OVERRIDES or kernel not in ("state_fwd", "state_bwd") or sequences_x_heads is None:
        return Launch(min(chosen.bv, V), chosen.warps, chosen.stages)
    return _fill_the_gpu(kernel, chosen, K, V, dtype_bytes, sequences_x_heads)


def _fill_the_gpu(kernel: str, chosen: Launch, K: int, V: int, dtype_bytes: int, sequences_x_heads: int) -> Launch:
    """A state pass at K <= 128 (V-block 64 or 32) whose programs would not cover the multiprocessors splits V
    finer: V-block 32 on 4 warps and 2 stages (a setting Triton 3.6 compiled correctly on Hopper). At 16-bit inputs,
    when the programs then number at most one per multiprocessor, it goes on to 16 while they still do, with a deeper
    pipeline (4 stages forward, 3 reverse): with so few programs each chunk's loads wait on memory, and the next
    chunks' loads are issued early. On an H200 at bf16 K = V = 128 (tune_kernels.py, 2026-12-02, us per
    forward+backward): forward 1341 -> 729 at 1 x 32768 x 8 heads, 900 -> 511 at 2 x 16384 x 16; reverse 965 -> 613
    and 588 -> 392. Every shape tuned had at most one program per multiprocessor; with more (8 x 2048 x 8 heads: 256),
    the split stays as it was until timed. float32 (not tuned) takes the V-block 32 split."""
    bv = min(chosen.bv, V)
    sms = _multiprocessors()
    tuned_block = bv == 64 or (bv == 32 and V > 32)  # V = 32's forced V-block of 32 was never timed split
    if K > 128 or not tuned_block or chosen.stages < 2 or sequences_x_heads * -(-V // bv) >= sms:
        return Launch(bv, chosen.warps, chosen.stages)
    bv = 32
    if dtype_bytes != 2 or sequences_x_heads * -(-V // bv) > sms:
        return Launch(bv, 4, 2)
    while bv > 16 and sequences_x_heads * -(-V // (bv // 2)) <= sms:
        bv //= 2
    return Launch(bv, 4, 4 if kernel == "state_fwd" else 3)


@functools.cache
def _multiprocessors() -> int:
    """Multiprocessors of the current CUDA device (0 without CUDA: nothing to fill)."""
    if not torch.cuda.is_available():
        return 0
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
