"""The Triton kernels' settings: float32 dot precision, launch overrides and whether the forward keeps T.

Settings are a frozen ``KernelSettings`` passed into a block with ``kernel_settings``; the kernels' launchers read the
active ones (``active_settings``) where they use them. Nothing is patched on a module:

    with kernel_settings(fp32_dot_precision="ieee", launch_overrides={"out": Launch(bv=64, warps=4, stages=2)}):
        o, _ = efla_attention(q, k, v, beta, backend="triton")

The active settings are one module attribute, swapped by ``kernel_settings`` and restored when its block ends (not a
ContextVar: torch.compile cannot trace ``ContextVar.get``, and it guards a compiled graph on a module attribute it
reads, so a graph traced under one precision is traced again under another). Threads share them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from collections.abc import Iterator, Mapping

KERNELS = ("wy_fwd", "state_fwd", "out", "state_bwd", "grad_qk", "grad_wy")
FP32_DOT_PRECISIONS = ("tf32x3", "ieee")


@dataclasses.dataclass(frozen=True)
class Launch:
    """How one kernel is launched: its V-block (columns of V per program or per loop step), warps, stages."""

    bv: int
    warps: int
    stages: int


@dataclasses.dataclass(frozen=True)
class KernelSettings:
    """How the Triton backend runs.

    fp32_dot_precision: dot products for float32 inputs, "tf32x3" (three tf32 tensor-core products per dot,
        float32-accurate) or "ieee" (exact float32 FMA; slow, and compiling the gradient kernels takes minutes).
        ``torch.backends.cuda.matmul.allow_tf32 = True`` selects plain tf32 instead, the switch PyTorch users know.
    launch_overrides: kernel name (one of ``KERNELS``) -> the ``Launch`` it runs with for every call (its V-block
        capped at V), in place of the defaults of ``launch.py``: what ``benchmarks/tune_kernels.py`` sweeps.
    save_t: whether the training forward keeps T (64 values per token and head, input dtype) for the backward, whose
        kernels then load it instead of inverting the triangular system twice more.
    """

    fp32_dot_precision: str = "tf32x3"
    launch_overrides: Mapping[str, Launch] = dataclasses.field(default_factory=dict)
    save_t: bool = True

    def __post_init__(self) -> None:
        if self.fp32_dot_precision not in FP32_DOT_PRECISIONS:
            raise ValueError(f"fp32_dot_precision must be one of {FP32_DOT_PRECISIONS} "
                             f"(got {self.fp32_dot_precision!r})")
        for kernel, setting in self.launch_overrides.items():
            if kernel not in KERNELS:
                raise ValueError(f"launch_overrides names unknown kernel {kernel!r}; expected one of {KERNELS}")
            if not isinstance(setting, Launch):
                raise TypeError(f"launch_overrides[{kernel!r}] must be a Launch (got {type(setting).__name__})")
        # read-only, so that a block's settings cannot change under it
        object.__setattr__(self, "launch_overrides", types.MappingProxyType(dict(self.launch_overrides)))


_active = KernelSettings()


def active_settings() -> KernelSettings:
    """The settings the kernels run with now: the innermost ``kernel_settings`` block's, else the defaults."""
    return _active


@contextlib.contextmanager
def kernel_settings(settings: KernelSettings | None = None, **changes) -> Iterator[KernelSettings]:
    """Run the block with ``settings`` (default: the active ones) with ``changes`` (``KernelSettings`` fields) applied;
    the previous settings return when it ends. Yields the settings in force."""
    global _active
    chosen = dataclasses.replace(active_settings() if settings is None else settings, **changes)
    previous, _active = _active, chosen
    try:
        yield chosen
    finally:
        _active = previous
