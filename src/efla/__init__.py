"""efla: Error-Free Linear Attention, the exact solution of the delta-rule ODE, as an operator, layer and model.

``import efla`` imports torch and the operator only. The transformers models (an optional dependency) load on first
use of ``efla.EFLAConfig`` / ``efla.EFLAModel`` / ``efla.EFLAForCausalLM`` or ``import efla.models``, and model_type
"efla" is registered with transformers' Auto classes before any of them is used (``efla.hf_registration``).
"""

import importlib.util

from efla import hf_registration
from efla.ops import alpha_from_beta, efla_attention, efla_final_state

__version__ = "0.1.0"
__all__ = ["__version__", "alpha_from_beta", "efla_attention", "efla_final_state"]

_MODEL_NAMES = ("EFLAConfig", "EFLAForCausalLM", "EFLAModel")
if importlib.util.find_spec("transformers") is not None:
    __all__ += _MODEL_NAMES
    hf_registration.install()


def __getattr__(name: str) -> object:
    """The model classes, imported from ``efla.models`` (and so from transformers) only when first asked for."""
    if name in _MODEL_NAMES:
        import efla.models

        return getattr(efla.models, name)
    raise AttributeError(f"module 'efla' has no attribute {name!r}")
