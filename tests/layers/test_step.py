"""The layer's own decoding: ``allocate_inference_cache`` then ``step`` token by token continues its forward."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err

from efla.layers import EFLAttention


def test_allocated_state_has_the_layers_shapes():
    layer = EFLAttention(32, 2, conv_size=4, layer_idx=0)
    conv, recurrent = layer.allocate_inference_cache(3, dtype=torch.bfloat16)
    assert conv.shape == (3, 3 * 32, 3) and conv.dtype == torch.bfloat16 and not conv.any()
    assert recurrent.shape == (3, 2, 16, 16) and recurrent.dtype == torch.float32 and not recurrent.any()
    assert EFLAttention(32, 2, use_short_conv=False).allocate_inference_cache(1)[0] is None


@pytest.mark.parametrize("options", [dict(), dict(mode="delta", use_output_gate=True), dict(use_decay_gate=True),
                                     dict(use_short_conv=False), dict(conv_size=1)],
                         ids=["efla", "delta-gate", "decay", "no-conv", "conv-1"])
def test_steps_continue_the_forward(options):
    """A prefix through the forward, then one token at a time through step over the allocated state, gives the
    forward's outputs over the whole sequence, and advances the state in place."""
    torch.manual_seed(0)
    layer = EFLAttention(32, 2, layer_idx=0, chunk_size=4, **options).eval()
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        whole = layer(x)
        conv, recurrent = layer.allocate_inference_cache(2)
        addresses = [t.data_ptr() for t in (conv, recurrent) if t is not None]
        outputs = [layer.step(x[:, t:t + 1], conv, recurrent) for t in range(9)]
    assert rel_err(torch.cat(outputs, 1), whole) < 1e-5
    assert recurrent.abs().max() > 0
    assert addresses == [t.data_ptr() for t in (conv, recurrent) if t is not None]


def test_step_takes_one_token_per_row():
    layer = EFLAttention(32, 2, layer_idx=0)
    with pytest.raises(ValueError, match="one token per row"):
        layer.step(torch.randn(2, 3, 32), *layer.allocate_inference_cache(2))
