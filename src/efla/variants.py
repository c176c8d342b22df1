"""The four token mixers the studies compare, by name: each one's model config fields and the name a report prints
(kept outside ``efla.models`` so that a command's options can list them without importing transformers).

"efla" and "delta" are EFLA and DeltaNet; "gated-efla" and "gated-delta" add the decay gate (gated EFLA, Gated
DeltaNet), with equal parameter counts within each pair. ``efla compare-lm`` and ``efla mqar`` take these names.
"""

from __future__ import annotations

from typing import Any

VARIANTS: dict[str, dict[str, Any]] = {
    "efla": {"attn_mode": "efla"},
    "delta": {"attn_mode": "delta"},
    "gated-efla": {"attn_mode": "efla", "use_decay_gate": True},
    "gated-delta": {"attn_mode": "delta", "use_decay_gate": True},
}
DISPLAY_NAMES = {"efla": "EFLA", "delta": "DeltaNet", "gated-efla": "gated EFLA", "gated-delta": "Gated DeltaNet"}


def variant_fields(name: str) -> dict[str, Any]:
    """The config fields of variant ``name`` (a copy), or a one-line error naming the choices."""
    if name not in VARIANTS:
        raise ValueError(f"model variant must be one of {list(VARIANTS)} (got {name!r})")
    return dict(VARIANTS[name])
