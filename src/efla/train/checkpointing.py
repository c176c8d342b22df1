"""Activation checkpointing, applied by the trainer to the model it built (as torchtitan applies it to a plain model):
a training setting, never stored in the model's config or checkpoints.

    none        every activation is kept
    selective   EFLA models only: the EFLA layers recompute their cheap element-wise work in the backward
    full        each block keeps only its input and is recomputed whole (any transformers model that supports it)

Both recomputing policies go through transformers' ``activation_checkpointing_enable`` (EFLA's takes the policy in
its kwargs: ``EFLAPreTrainedModel.activation_checkpointing_enable``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from efla.train.config import ACTIVATION_CHECKPOINTING


def check_activation_checkpointing(model_config: Any, policy: str) -> None:
    """Raise before any work when ``policy`` is unknown or the model of ``model_config`` cannot apply it."""
    from efla.models import EFLAConfig

    if policy not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"activation_checkpointing must be one of {ACTIVATION_CHECKPOINTING} (got {policy!r})")
    if policy == "selective" and not isinstance(model_config, EFLAConfig):
        raise ValueError(f"activation_checkpointing 'selective' needs an EFLA model; {type(model_config).__name__} "
                         "supports none or full")


def apply_activation_checkpointing(model: nn.Module, policy: str) -> None:
    """Set ``policy`` (none | selective | full) on a built transformers model, before it is compiled or wrapped."""
    from efla.models import EFLAPreTrainedModel

    check_activation_checkpointing(model.config, policy)
    if policy == "none":
        return
    if isinstance(model, EFLAPreTrainedModel):
        model.activation_checkpointing_enable({"policy": policy})
    else:
        model.activation_checkpointing_enable({"use_reentrant": False})
