"""Named model sizes: the paper's 340M and 1.3B scales (fla/flame's DeltaNet configs) and a tiny one for tests."""

from __future__ import annotations

from typing import Any

from efla.models.configuration_efla import EFLAConfig

PRESETS: dict[str, dict[str, Any]] = {
    # flame configs/delta_net_340M.json and delta_net_1B.json: 24 layers, head dim 128, SwiGLU ratio 4,
    # short conv 4, no output gate, untied embeddings, the 32000-token Llama tokenizer (fla-hub/transformer-1.3B-100B)
    "340M": dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=24, num_heads=8),
    "1.3B": dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=24, num_heads=16),
    "tiny": dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_heads=2, intermediate_size=128,
                 max_position_embeddings=512),
}


def preset_config(name: str, **overrides: Any) -> EFLAConfig:
    """The EFLAConfig of a named preset ("340M", "1.3B", "tiny"), with any field overridden (e.g. attn_mode="delta")."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)} (got {name!r})")
    return EFLAConfig(**{**PRESETS[name], **overrides})
