"""The paper's three test-time corruptions of pixel intensities in [0, 1], and their evaluation grids."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def scale_intensity(pixels: torch.Tensor, factor: float, generator: torch.Generator) -> torch.Tensor:
    """Out-of-distribution brightness: every pixel times ``factor`` (no clipping, so 10 means values up to 10)."""
    return pixels * factor


def gaussian_noise(pixels: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Additive N(0, std^2) noise on every pixel, background included (no clipping)."""
    noise = torch.randn(pixels.shape, generator=generator, device=generator.device, dtype=pixels.dtype)
    return pixels + std * noise


def pixel_dropout(pixels: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Each pixel set to 0 independently with probability ``p`` (p = 1 leaves a blank image)."""
    keep = torch.rand(pixels.shape, generator=generator, device=generator.device) >= p
    return pixels * keep


@dataclass(frozen=True)
class Corruption:
    """A corruption, its grid of levels and the level at which it leaves the image unchanged."""

    name: str
    label: str
    apply: Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]
    levels: tuple[float, ...]
    identity: float


def _grid(start: float, stop: float, step: float) -> tuple[float, ...]:
    return tuple(round(start + i * step, 6) for i in range(round((stop - start) / step) + 1))


CORRUPTIONS: tuple[Corruption, ...] = (
    Corruption("ood_scale", "intensity scale", scale_intensity, _grid(1.0, 10.0, 1.0), identity=1.0),
    Corruption("gaussian_noise", "Gaussian noise std", gaussian_noise, _grid(0.0, 1.0, 0.1), identity=0.0),
    Corruption("pixel_dropout", "pixel dropout probability", pixel_dropout, _grid(0.0, 1.0, 0.1), identity=0.0),
)
