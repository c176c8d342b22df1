"""fla refuses its gated backward on Hopper with Triton 3.4 to 3.7.0: a Triton miscompile makes its dk and dg wrong
(fla issue 640). The work it does is the same, so the benchmarks lift the guard for timing only (they never compare
fla's gated gradients). Ours avoids the miscompiled pattern (``efla/ops/triton/wy.py``, ``_log_decay``)."""

from __future__ import annotations


def time_fla_gated_backward_anyway() -> None:
    """Lift the guard if this fla has it and it is active, and say so."""
    import fla.ops.common.chunk_o as chunk_o

    if hasattr(chunk_o, "TRITON_ABOVE_3_7_1") and not chunk_o.TRITON_ABOVE_3_7_1:
        chunk_o.TRITON_ABOVE_3_7_1 = True
        print("note: fla's guard on its gated backward (Triton < 3.7.1 on Hopper, fla issue 640) lifted for timing; "
              "its gradients are not used", flush=True)
