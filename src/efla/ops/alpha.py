"""EFLA's step sizes, computed stably with exact gradients: alpha = (1 - exp(-beta * lambda)) / lambda, and with a
decay gate g the write step eta = beta * phi(beta * lambda - g).

Write x = beta * lambda and phi(x) = (1 - e^-x) / x (phi(0) = 1). Then alpha = beta * phi(x) and

    d alpha / d beta   = phi(x) + x phi'(x) = e^-x
    d alpha / d lambda = beta^2 phi'(x),      phi'(x) = (e^-x - phi(x)) / x  (-> -1/2 at x = 0)

phi is evaluated as -expm1(-x) / x, which is accurate for every x > 0. phi' cancels badly for small x, so there it is
the Taylor series phi'(x) = sum_{n>=1} (-1)^n n x^(n-1) / (n+1)!; at x >= 1 the closed form loses only a few ulps.
Both are finite for lambda = 0, beta = 0 and beta * lambda up to any size (e^-x underflows cleanly to 0).

Gated EFLA (decay gate g = log gamma <= 0 over the same duration) erases with alpha and writes with
eta = beta * phi(y), y = beta * lambda - g >= 0 (derivation in ``efla/ops/recurrent.py``). With the identity
phi(y) + y phi'(y) = e^-y,

    d eta / d beta   = phi(y) + beta lambda phi'(y) = e^-y + g phi'(y)   (two terms >= 0: no cancellation)
    d eta / d lambda = beta^2 phi'(y),      d eta / d g = -beta phi'(y)

finite for every beta, lambda >= 0 and g <= 0. g = 0 gives eta = alpha exactly (the same y, the same operations).
"""

from __future__ import annotations

import math

import torch

_SERIES_TERMS = 16  # for x < 1 the truncation error is below 1 / 18!, far under float64 round-off


def _phi(x: torch.Tensor) -> torch.Tensor:
    """(1 - e^-x) / x; exactly 1 below the smallest normal number, where x/2 is far under round-off."""
    tiny = x < torch.finfo(x.dtype).tiny
    safe_x = torch.where(tiny, torch.ones_like(x), x)
    return torch.where(tiny, torch.ones_like(x), -torch.expm1(-safe_x) / safe_x)


def _phi_prime(x: torch.Tensor) -> torch.Tensor:
    """d phi / dx: Taylor series below x = 1 (Horner form), the closed form above."""
    series = torch.zeros_like(x)
    for n in range(_SERIES_TERMS, 0, -1):
        series = series * x + ((-1) ** n) * n / math.factorial(n + 1)
    large = x >= 1
    safe_x = torch.where(large, x, torch.ones_like(x))
    closed = (torch.exp(-safe_x) - _phi(safe_x)) / safe_x
    return torch.where(large, closed, series)


_SATURATED = 50.0  # x e^-x < 1e-20 beyond this: beta e^-x is nothing beside alpha = (1 - e^-x) / lambda


def _alpha(beta: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x = beta lambda, alpha): beta phi(x) below x = 1, (1 - e^-x) / lambda above (also for x = inf)."""
    x = torch.where(lam == 0, torch.zeros_like(beta), beta * lam)  # beta = inf on a zero key: no step at all
    large = x >= 1
    safe_lam = torch.where(large, lam, torch.ones_like(lam))
    return x, torch.where(large, -torch.expm1(-x) / safe_lam, torch.where(large, 0, beta) * _phi(x))


class _AlphaFromBeta(torch.autograd.Function):
    """alpha = beta phi(x) for x = beta lambda < 1, and (1 - e^-x) / lambda above, so that beta lambda beyond the
    dtype's range (x = inf, or beta = inf) still gives alpha = 1 / lambda, the exact limit."""

    @staticmethod
    def forward(ctx, beta: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        x, alpha = _alpha(beta, lam)
        ctx.save_for_backward(beta, lam, x, alpha)
        return alpha

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        beta, lam, x, alpha = ctx.saved_tensors
        grad_beta = grad_alpha * torch.exp(-x)
        large = x >= 1
        safe_lam = torch.where(large, lam, torch.ones_like(lam))
        small_beta = torch.where(large, 0, beta)
        # beta^2 phi'(x) = (beta e^-x - alpha) / lambda for x >= 1 (beta e^-x -> 0 past saturation, also at beta = inf)
        fresh = torch.where(x > _SATURATED, 0, torch.where(large, beta, 0) * torch.exp(-x))
        dalpha_dlam = torch.where(large, (fresh - alpha) / safe_lam, small_beta * small_beta * _phi_prime(x))
        return grad_beta, grad_alpha * dalpha_dlam


class _EtaFromBeta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, beta: torch.Tensor, lam: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        y = beta * lam - g
        ctx.save_for_backward(beta, g, y)
        return torch.where(g == 0, _alpha(beta, lam)[1], beta * _phi(y))  # no decay: EFLA's alpha, bit for bit

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_eta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        beta, g, y = ctx.saved_tensors
        phi_prime = _phi_prime(y)
        grad_beta = grad_eta * (torch.exp(-y) + g * phi_prime)
        grad_lam = grad_eta * beta * beta * phi_prime
        grad_g = -grad_eta * beta * phi_prime
        return grad_beta, grad_lam, grad_g


def alpha_from_beta(beta: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """EFLA's exact step size for duration ``beta`` along a key of squared norm ``lam`` (same shape, both >= 0).

    Computed in float32 or better (float64 stays float64) and returned in that precision. Equals ``beta`` where
    ``lam == 0``; values and gradients stay finite for beta = 0, lam = 0 and beta * lam up to 1e4 and beyond.
    """
    dtype = torch.promote_types(torch.promote_types(beta.dtype, lam.dtype), torch.float32)
    return _AlphaFromBeta.apply(beta.to(dtype), lam.to(dtype))


def eta_from_beta(beta: torch.Tensor, lam: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Gated EFLA's exact write step for duration ``beta``, key norm ``lam`` (>= 0) and log decay ``g`` (<= 0).

    eta = beta * phi(beta lam - g): the integral over the step of the decay exp(-(s (lam + c))) that the written
    k v^T sees (c = -g / beta). Same shapes; computed in float32 or better and returned in that precision. Equals
    ``alpha_from_beta(beta, lam)`` where g = 0 and beta * phi(-g) where lam = 0; 0 <= eta <= alpha; values and
    gradients stay finite for beta = 0, lam = 0, g = 0, g down to -1e4 and beta * lam up to 1e4 and beyond.
    """
    dtype = torch.promote_types(torch.promote_types(beta.dtype, lam.dtype), torch.promote_types(g.dtype, torch.float32))
    return _EtaFromBeta.apply(beta.to(dtype), lam.to(dtype), g.to(dtype))


def step_sizes(k: torch.Tensor, beta: torch.Tensor, mode: str) -> torch.Tensor:
    """The per-token step size of the recurrence: EFLA's alpha, or beta itself for DeltaNet (``mode="delta"``).

    k: [..., K], beta: [...]; the result has beta's shape in float32 or better.
    """
    if mode == "delta":
        return beta.to(torch.promote_types(beta.dtype, torch.float32))
    lam = k.to(torch.promote_types(k.dtype, torch.float32)).square().sum(-1)
    return alpha_from_beta(beta, lam)


def unit_key_form(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EFLA as the delta rule on unit keys: (k / ||k||, v / ||k||, a) with a = alpha ||k||^2 = 1 - exp(-beta ||k||^2).

    alpha k k^T = a k^ k^T and alpha k v^T = a k^ (v / ||k||)^T, so the recurrence with these keys, values and step
    is EFLA's, while no product ever holds ||k||^2: finite for keys up to the dtype's largest value and for any
    beta >= 0 including inf (a -> 1, the projection onto k's complement). A zero key gives a zero step. Computed in
    float32 or better; differentiable by autograd.
    """
    dtype = torch.promote_types(torch.promote_types(k.dtype, beta.dtype), torch.float32)
    k, beta = k.to(dtype), beta.to(dtype)
    peak = k.abs().amax(-1, keepdim=True)  # ||k|| = peak * ||k / peak||, whose square cannot overflow
    zero = peak == 0
    shrunk = k / torch.where(zero, torch.ones_like(peak), peak)
    norm = peak * shrunk.norm(dim=-1, keepdim=True)
    safe_norm = torch.where(zero, torch.ones_like(norm), norm)
    x = torch.where(zero[..., 0], torch.zeros_like(beta), (beta * norm[..., 0]) * norm[..., 0])
    return k / safe_norm, torch.where(zero, 0, v.to(dtype) / safe_norm), -torch.expm1(-x)


def gated_step_sizes(k: torch.Tensor, beta: torch.Tensor, g: torch.Tensor, mode: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated recurrence's erase and write step sizes (alpha, eta): EFLA's exact pair, or (beta, beta) for Gated
    DeltaNet (``mode="delta"``).

    k: [..., K], beta and g: [...]; both results have beta's shape in float32 or better.
    """
    dtype = torch.promote_types(torch.promote_types(beta.dtype, g.dtype), torch.float32)
    if mode == "delta":
        return beta.to(dtype), beta.to(dtype)
    lam = k.to(torch.promote_types(k.dtype, dtype)).square().sum(-1)
    return alpha_from_beta(beta.to(dtype), lam), eta_from_beta(beta.to(dtype), lam, g)
