"""``varlen.run_packed`` behind a torch.compile graph break, for the PyTorch backends' packed sequences.

Its shapes follow sequence lengths read on the host, so traced it would recompile for every new set of lengths;
torch.compile sees one graph break here instead (the Triton backend reads the lengths inside its custom ops and needs
none). Imported only while compiling: ``torch.compiler.disable`` imports torch._dynamo (about a second on a small
machine), which ``import efla`` and eager calls never need.
"""

from __future__ import annotations

import torch

from efla.ops.varlen import run_packed

run_packed_untraced = torch.compiler.disable(run_packed)
