"""EFLA language models as transformers classes (needs ``transformers``): config, backbone, causal LM, presets.

Importing this package registers model_type "efla" with AutoConfig, AutoModel and AutoModelForCausalLM, so the Auto
classes load EFLA checkpoints without trust_remote_code.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from efla.models.configuration_efla import EFLAConfig
from efla.models.legacy_weights import register_legacy_weight_names
from efla.models.modeling_efla import EFLAForCausalLM, EFLAModel, EFLAPreTrainedModel
from efla.models.presets import PRESETS, preset_config

AutoConfig.register(EFLAConfig.model_type, EFLAConfig, exist_ok=True)
AutoModel.register(EFLAConfig, EFLAModel, exist_ok=True)
AutoModelForCausalLM.register(EFLAConfig, EFLAForCausalLM, exist_ok=True)
register_legacy_weight_names()

__all__ = ["PRESETS", "EFLAConfig", "EFLAForCausalLM", "EFLAModel", "EFLAPreTrainedModel", "preset_config"]
