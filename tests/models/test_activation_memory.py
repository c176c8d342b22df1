"""What one block keeps for the backward on the fused path (the Triton kernels, in the interpreter on CPU): every
activation once, none of the intermediates the fused functions form again. Counted by storage, so a tensor that two
ops keep counts once; a second copy of anything (an L2 norm's input beside its output, a norm's output beside its
input) makes the count too large."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from helpers import kept_for_backward, storage_bytes

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None
    or (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="the Triton kernels need triton and a GPU or TRITON_INTERPRET=1")

C, H, I, W = 64, 2, 96, 4  # hidden size, heads, MLP width, convolution taps
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _saved_bytes(block: torch.nn.Module, tokens: int) -> int:
    """Bytes of the distinct storages a block's forward keeps for the backward, parameters excluded."""
    x = torch.randn(1, tokens, C, device=DEVICE, requires_grad=True)
    _, kept = kept_for_backward(lambda: block(x))
    return storage_bytes(kept, {p.untyped_storage().data_ptr() for p in block.parameters()})


@pytest.mark.parametrize("mode", ["efla", "delta"])
def test_a_block_keeps_each_activation_once(mode, monkeypatch):
    import efla.layers.attention as attention
    import efla.modules.elementwise as elementwise
    from efla.models import preset_config
    from efla.models.modeling_efla import EFLABlock
    from efla.modules.triton.short_conv import short_conv_silu_split

    # the GPU's dispatch on CPU: the fused norm, SwiGLU and convolution kernels (float32 in the interpreter)
    monkeypatch.setattr(elementwise, "runs_fused_kernels", lambda x: x.dtype != torch.float64)
    monkeypatch.setattr(attention, "short_conv_split",
                        lambda x, weight, n, state, cu_seqlens: short_conv_silu_split(x, weight, n, cu_seqlens))
    config = preset_config("tiny", attn_backend="triton", attn_mode=mode, hidden_size=C, num_heads=H,
                           intermediate_size=I, conv_size=W)
    block = EFLABlock(config, 0).to(DEVICE)
    torch.manual_seed(0)
    per_token = (_saved_bytes(block, 128) - _saved_bytes(block, 64)) / 64
    element = 4  # float32
    activations = (C  # the attention norm's input
                   + C  # its output, the q/k/v and beta projections' input
                   + 3 * C  # q, k, v projected side by side: the convolution's input
                   + 3 * C  # q, k, v as the attention takes them (q, and in delta mode k, L2-normalised: the norm's
                   #          output is that same tensor)
                   + 64 * H  # T, the WY system's inverse, kept by the chunk forward
                   + C  # the attention output: the output norm's input (its output is formed again)
                   + C  # the MLP norm's input (its output, the gate/up projection's input, is formed again)
                   + 2 * I)  # gate and up side by side: SwiGLU's input (its output is formed again)
    float32_per_row = (1 + 1  # the two RMSNorms' scales
                       + H * (2 if mode == "delta" else 1)  # the L2 norms' scales
                       + H  # beta
                       + H)  # the output norm's scales
    positions = 4  # the convolution's int32 position of each token in its sequence
    assert per_token == element * activations + 4 * float32_per_row + positions
