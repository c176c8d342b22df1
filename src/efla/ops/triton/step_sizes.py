"""EFLA's step sizes inside the kernels, from beta, lambda = ||k||^2 and (gated) the log decay g, and their derivatives.

The same math as ``efla/ops/alpha.py`` (derivations there), in float32 on values already in registers, so that
neither alpha nor the write step eta goes to memory: ``step_size`` (alpha, or beta itself for the delta rule),
``gated_step_sizes`` (alpha and eta) and ``step_size_slopes`` (their derivatives, for the gradient pass).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _phi(x):
    """(1 - e^-x) / x: Taylor series below 0.5 (Horner, 12 terms), the closed form above."""
    small = x < 0.5
    xs = tl.where(small, x, 0.0)
    series = tl.zeros_like(x) + 1.0
    for m in tl.static_range(13, 1, -1):  # phi = 1 - x/2 (1 - x/3 (1 - x/4 (...)))
        series = 1.0 - xs / m * series
    xl = tl.where(small, 1.0, x)
    return tl.where(small, series, (1.0 - tl.exp(-xl)) / xl)


@triton.jit
def _phi_prime(x):
    """d phi / dx: Taylor series below 1 (16 terms), (e^-x - phi(x)) / x above."""
    small = x < 1.0
    xs = tl.where(small, x, 0.0)
    series = tl.zeros_like(x) + 1.0
    # phi' = -1/2 (1 - x 2/(1*3) (1 - x 3/(2*4) (1 - ...))), ratio of terms n+1 and n is -x (n+1) / (n (n+2))
    for n in tl.static_range(15, 0, -1):
        series = 1.0 - xs * ((n + 1) / (n * (n + 2))) * series
    xl = tl.where(small, 1.0, x)
    return tl.where(small, -0.5 * series, (tl.exp(-xl) - _phi(xl)) / xl)


@triton.jit
def step_size(beta, lam, EFLA: tl.constexpr):
    """alpha for EFLA (beta phi(x) below x = beta lam = 1, (1 - e^-x) / lam above, so x = inf or beta = inf give the
    exact limit 1 / lam; a zero key gives no step), beta itself for the delta rule."""
    if EFLA:
        x = tl.where(lam == 0.0, 0.0, beta * lam)
        large = x >= 1.0
        return tl.where(large, (1.0 - tl.exp(-x)) / tl.where(large, lam, 1.0),
                        tl.where(large, 0.0, beta) * _phi(tl.where(large, 0.0, x)))
    else:
        return beta


@triton.jit
def gated_step_sizes(beta, lam, g, EFLA: tl.constexpr):
    """(alpha, eta), the erase and write steps of the gated recurrence: EFLA's alpha and eta = beta phi(beta lam - g)
    (alpha itself where g = 0, so no decay gives the ungated step bit for bit), or (beta, beta) for Gated DeltaNet."""
    if EFLA:
        alpha = step_size(beta, lam, EFLA)
        y = tl.where(lam == 0.0, 0.0, beta * lam) - g
        return alpha, tl.where(g == 0.0, alpha, beta * _phi(y))
    else:
        return beta, beta


@triton.jit
def step_size_slopes(beta, lam, g, alpha, EFLA: tl.constexpr, GATED: tl.constexpr):
    """The derivatives of alpha and eta (``gated_step_sizes``; without GATED eta is alpha, so its own are 0):
    (d alpha / d beta, d alpha / d lambda, d eta / d beta, d eta / d lambda, d eta / d g), with ``efla/ops/alpha.py``'s
    identities: d alpha / d beta = e^-x, d eta / d beta = e^-y + g phi'(y) (two terms >= 0), d eta / d lambda =
    beta^2 phi'(y), d eta / d g = -beta phi'(y); x = beta lambda, y = x - g. The gradient kernel forms them before its
    V loop, where few registers are live, and only multiplies by them after it (computed after the loop, this math
    made the kernel spill)."""
    if EFLA:
        x = tl.where(lam == 0.0, 0.0, beta * lam)
        if GATED:
            y = x - g
            slope = _phi_prime(y)
            return (tl.exp(-x), _alpha_lam_grad(beta, lam, alpha), tl.exp(-y) + g * slope, beta * beta * slope,
                    -beta * slope)
        else:
            zero = tl.zeros_like(lam)
            return tl.exp(-x), _alpha_lam_grad(beta, lam, alpha), zero, zero, zero
    else:
        one, zero = tl.zeros_like(lam) + 1.0, tl.zeros_like(lam)
        return one, zero, one, zero, zero


@triton.jit
def _alpha_lam_grad(beta, lam, alpha):
    """d alpha / d lam = beta^2 phi'(x): the series below x = 1, (beta e^-x - alpha) / lam above (beta e^-x taken as
    0 past x = 50, which also covers beta = inf), as ``efla/ops/alpha.py``."""
    x = tl.where(lam == 0.0, 0.0, beta * lam)
    large = x >= 1.0
    small_beta = tl.where(large, 0.0, beta)
    fresh = tl.where(large & (x <= 50.0), beta * tl.exp(-tl.minimum(x, 50.0)), 0.0)
    return tl.where(large, (fresh - alpha) / tl.where(large, lam, 1.0),
                    small_beta * small_beta * _phi_prime(tl.where(large, 0.0, x)))
