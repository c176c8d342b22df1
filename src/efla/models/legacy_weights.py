"""Loading checkpoints saved before EFLAttention's q, k and v were separated, through ``from_pretrained``.

Those hold ``attn.qkv_proj.weight`` [3 C, C] and ``attn.conv.weight`` [3 C, 1, W] (q's channels, then k's, then v's).
``EFLAttention`` splits them itself when a state dict is loaded with ``load_state_dict``; transformers'
``from_pretrained`` sets parameters without module hooks, so the same split is registered with its loader here. It is
load-only: saving always writes the separate names.
"""

from __future__ import annotations

from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Chunk, WeightConverter, WeightRenaming, WeightTransform

from efla.layers.attention import FUSED_WEIGHTS


class _SplitOnLoad(WeightConverter):
    """Chunk one fused weight into three along dim 0 when loading; saving leaves the three as they are."""

    def reverse_transform(self) -> WeightTransform:
        name = self._original_target_patterns[0]
        renaming = WeightRenaming(source_patterns=name, target_patterns=name)
        renaming.scope_prefix, renaming.base_model_prefix = self.scope_prefix, self.base_model_prefix
        return renaming


def register_legacy_weight_names() -> None:
    """Teach ``from_pretrained`` (model_type "efla") to split the fused q/k/v weights of old checkpoints."""
    register_checkpoint_conversion_mapping("efla", [
        _SplitOnLoad(source_patterns=f"attn\\.{fused}\\.weight", target_patterns=[f"attn.{p}.weight" for p in parts],
                     operations=[Chunk(dim=0)])
        for fused, parts in FUSED_WEIGHTS.items()
    ], overwrite=True)
