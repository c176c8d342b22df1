"""Triton kernels of the model's building blocks, one family per file; each file's PyTorch reference is named in its
docstring and tested against it."""
