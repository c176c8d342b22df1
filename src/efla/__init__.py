"""efla: Error-Free Linear Attention, the exact solution of the delta-rule ODE, as an operator, layer and model."""

import importlib.util

from efla.ops import alpha_from_beta, efla_attention

__version__ = "0.1.0"
__all__ = ["__version__", "alpha_from_beta", "efla_attention"]

# The transformers models are optional (core deps are torch and numpy); importing them registers model_type "efla"
# with the Auto classes.
if importlib.util.find_spec("transformers") is not None:
    from efla.models import EFLAConfig, EFLAForCausalLM, EFLAModel

    __all__ += ["EFLAConfig", "EFLAForCausalLM", "EFLAModel"]
