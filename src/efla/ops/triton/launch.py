"""Launch settings of the Triton kernels: V-block width, warps and software-pipeline stages, per kernel and head dims.

The defaults below are chosen by hand (the comments say why; the timings behind them are in BENCHMARKS.md's tuning
sections); ``benchmarks/tune_kernels.py`` sweeps alternatives on the GPU at hand, checking each against the defaults'
results. ``KernelSettings.launch_overrides`` (``settings.py``) replaces the default of a kernel for every call in a
``kernel_settings`` block: that script sets it to try candidates, and a user on another GPU can do the same without
editing code.
"""

from __future__ import annotations

import functools

import torch

from efla.ops.triton.settings import KERNELS, Launch, active_settings

GATED_BF16 = {
    64: {"state_bwd": Launch(64, 4, 3), "grad_qk": Launch(64, 4, 1), "grad_wy": Launch(32, 4, 2)},
    128: {"state_bwd": Launch(32, 4, 2), "grad_qk": Launch(64, 8, 1), "grad_wy": Launch(32, 4, 2)},
}
"""The gated backward's settings at 16-bit K = V = D, by D: the winners of ``tune_kernels.py --gated`` on an H200
(D = 64 at 8 x 4096 x 32 heads, D = 128 at 8 x 4096 x 16 heads; the three forward kernels' defaults were within 5 %
of their best). With the decay gate's extra tiles the passes run faster on fewer warps or narrower V-blocks than the
ungated settings. Other gated head dims keep the ungated settings until they are tuned."""


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
            # the winner of tune_kernels.py at bf16 8 x 4096 x 16 x 128 on an H200 (not tuned gated)
            return Launch(64, 8, 3)
        return Launch(bv, warps, 2 if K <= 128 or dtype_bytes == 2 else 1)
    # K = 16 gave wrong outputs with 4-8 warps (H200, Triton 3.6) and 2 warps fixed it; V = 16 is treated alike
    small = K <= 16 or V <= 16
    # 16-bit inputs with K, V <= 128: the winners of benchmarks/tune_kernels.py at bf16 K = V = 128 on an H200
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
    multiprocessors. With fewer programs (long context at small batch) the longer sequential chain of the combined
    pass lost to the two passes, and at K = 128 the output pass is the cheaper part."""
    if K > 64:  # first: this runs on every forward call's host path
        return False
    return sequences_x_heads * -(-V // launch("state_fwd", K, V, dtype_bytes).bv) >= multiprocessors()


def launch(kernel: str, K: int, V: int, dtype_bytes: int, sequences_x_heads: int | None = None,
           gated: bool = False) -> Launch:
    """The settings ``kernel`` runs with for head dims K, V and inputs of ``dtype_bytes`` bytes per element (``gated``:
    the decay-gated form): the active ``launch_overrides[kernel]`` if set (its V-block capped at V), else the
    default. For the state passes, which run one program per (sequence, head, V-block), ``sequences_x_heads`` lets a
    launch with fewer programs than the GPU has multiprocessors (long context at small batch) split V finer."""
    overridden = active_settings().launch_overrides.get(kernel)
    chosen = overridden or _default(kernel, K, V, dtype_bytes, gated)
    if overridden or kernel not in ("state_fwd", "state_bwd") or sequences_x_heads is None:
        return Launch(min(chosen.bv, V), chosen.warps, chosen.stages)
    return _fill_the_gpu(kernel, chosen, K, V, dtype_bytes, sequences_x_heads)


def _fill_the_gpu(kernel: str, chosen: Launch, K: int, V: int, dtype_bytes: int, sequences_x_heads: int) -> Launch:
    """A state pass at K <= 128 (V-block 64 or 32) whose programs would not cover the multiprocessors splits V
    finer: V-block 32 on 4 warps and 2 stages (a setting Triton 3.6 compiled correctly on Hopper). At 16-bit inputs,
    when the programs then number at most one per multiprocessor, it goes on to 16 while they still do, with a deeper
    pipeline (4 stages forward, 3 reverse): with so few programs each chunk's loads wait on memory, and the next
    chunks' loads are issued early. Every shape tuned (bf16 K = V = 128 on an H200) had at most one program per
    multiprocessor; with more, the split stays as it was until timed. float32 (not tuned) takes the V-block 32
    split."""
    bv = min(chosen.bv, V)
    sms = multiprocessors()
    tuned_block = bv == 64 or (bv == 32 and V > 32)  # V = 32's forced V-block of 32 was never timed split
    if K > 128 or not tuned_block or chosen.stages < 2 or sequences_x_heads * -(-V // bv) >= sms:
        return Launch(bv, chosen.warps, chosen.stages)
    bv = 32
    if dtype_bytes != 2 or sequences_x_heads * -(-V // bv) > sms:
        return Launch(bv, 4, 2)
    while bv > 16 and sequences_x_heads * -(-V // (bv // 2)) <= sms:
        bv //= 2
    return Launch(bv, 4, 4 if kernel == "state_fwd" else 3)


def multiprocessors() -> int:
    """Multiprocessors of the current CUDA device, the one the kernels launch on (0 without CUDA: nothing to fill)."""
    if not torch.cuda.is_available():
        return 0
    return _multiprocessors_of(torch.cuda.current_device())


@functools.cache
def _multiprocessors_of(device_index: int) -> int:
    """Multiprocessors of CUDA device ``device_index``, read once per device (GPUs of one process may differ)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count
