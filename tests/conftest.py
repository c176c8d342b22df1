"""Session setup shared by all tests.

Without CUDA, efla's Triton kernels run in Triton's interpreter: TRITON_INTERPRET must be set before triton is first
imported, and importing efla's models already imports it (through torch._dynamo), so it is set here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
