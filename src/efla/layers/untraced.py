"""The context-parallel steps of a layer behind torch.compile graph breaks: the shard layout, the convolution's halo
exchange and the attention across ranks run eagerly, with their collectives in program order on every rank.

Traced, their collectives and host reads split the block into several graphs, and Inductor moved collectives across
those pieces: two gloo ranks then waited on each other for ever. Imported only while compiling, as
``efla/ops/untraced.py`` is: ``torch.compiler.disable`` imports torch._dynamo.
"""

from __future__ import annotations

import torch

from efla.layers.context_parallel import shard_layout, with_conv_halo
from efla.ops.context_parallel import efla_attention_cp

shard_layout_untraced = torch.compiler.disable(shard_layout)
with_conv_halo_untraced = torch.compiler.disable(with_conv_halo)
efla_attention_cp_untraced = torch.compiler.disable(efla_attention_cp)
