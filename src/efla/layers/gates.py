"""The gates of an EFLA layer, computed in float32 or better whatever the layer's dtype:

    beta = sigmoid(W_b x)                          the step duration of each head and token (``sigmoid32``)
    g = -exp(A_log) * softplus(W_a x + dt_bias)    Gated DeltaNet's log decay, <= 0 (``log_decay``)

and the decay gate's initial parameters (``decay_gate_init``). The layer's forward and its one-token step both use
them, so both compute the same gates.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def sigmoid32(x: torch.Tensor) -> torch.Tensor:
    """sigmoid in float32 or better (a float64 layer keeps float64)."""
    return _at_least_float32(x).sigmoid()


def log_decay(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """Gated DeltaNet's decay gate g = -exp(A_log) * softplus(a + dt_bias) (float32 or better, <= 0): a = W_a x
    [..., H] is a per-token rate, exp(A_log) and dt_bias per head."""
    return -_at_least_float32(A_log).exp() * F.softplus(_at_least_float32(a) + _at_least_float32(dt_bias))


def decay_gate_init(num_heads: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated DeltaNet's initial (A_log, dt_bias), float32 [num_heads]: A uniform in [1, 16], and dt log-uniform in
    [1e-3, 1e-1] (floored at 1e-4) stored through the inverse of softplus, so that softplus(dt_bias) = dt."""
    A = torch.empty(num_heads, device=device).uniform_(1, 16)
    dt = torch.exp(torch.rand(num_heads, device=device) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    dt = dt.clamp(min=1e-4)
    return A.log(), dt + torch.log(-torch.expm1(-dt))  # softplus^-1(dt) = dt + log(1 - e^-dt)
