"""efla: Error-Free Linear Attention, the exact solution of the delta-rule ODE, as an operator, layer and model."""

from efla.ops import alpha_from_beta, efla_attention

__version__ = "0.1.0"
__all__ = ["__version__", "alpha_from_beta", "efla_attention"]
