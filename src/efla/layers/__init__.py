"""nn.Modules built on the EFLA operator: the EFLA token mixer and the pieces of an EFLA model."""

from efla.layers.attention import EFLAttention
from efla.layers.conv import ShortConvolution
from efla.layers.norm import GatedRMSNorm, RMSNorm
from efla.layers.softmax_attention import SoftmaxAttention

__all__ = ["EFLAttention", "GatedRMSNorm", "RMSNorm", "ShortConvolution", "SoftmaxAttention"]
