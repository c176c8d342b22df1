"""The EFLA operator: references, chunkwise PyTorch form, GPU kernels, and the public ``efla_attention``."""

from efla.ops.alpha import alpha_from_beta
from efla.ops.interface import efla_attention, efla_final_state

__all__ = ["alpha_from_beta", "efla_attention", "efla_final_state"]
