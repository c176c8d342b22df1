"""The model's building blocks beside the operator: fused RMSNorm, SwiGLU and q/k L2 norm that keep only their inputs
(``elementwise.py``), several projections in one matmul (``linear.py``), and their Triton kernels (``triton/``: the
norms, SwiGLU, the chunked cross-entropy, the short convolution and a layer's fused decode step)."""
