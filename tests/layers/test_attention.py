"""EFLAttention, ShortConvolution and SoftmaxAttention: padding never leaks into a sequence, caches continue exactly."""

from __future__ import annotations

import pytest
import torch

from efla.layers import EFLAttention, ShortConvolution, SoftmaxAttention

ATOL = 1e-5


def _mask(lengths_and_offsets: list[tuple[int, int]], T: int) -> torch.Tensor:
    """Row b is 1 on [offset, offset + length): left, right and both-sided padding."""
    mask = torch.zeros(len(lengths_and_offsets), T, dtype=torch.long)
    for b, (length, offset) in enumerate(lengths_and_offsets):
        mask[b, offset:offset + length] = 1
    return mask


def _linear_cache(num_layers: int):
    cache_utils = pytest.importorskip("transformers.cache_utils")
    return cache_utils.Cache(layers=[cache_utils.LinearAttentionLayer() for _ in range(num_layers)])


def test_short_conv_continues_from_its_state():
    torch.manual_seed(0)
    conv = ShortConvolution(6, 4)
    x = torch.randn(2, 10, 6)
    y, state = conv(x)
    y1, state1 = conv(x[:, :3])
    y2, state2 = conv(x[:, 3:], state1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, atol=ATOL, rtol=0)
    torch.testing.assert_close(state2, state, atol=0, rtol=0)
    # with lengths, the state is that of each row's valid prefix alone
    _, state_short = conv(x[1:, :2])
    _, states = conv(x, lengths=torch.tensor([10, 2]))
    torch.testing.assert_close(states, torch.cat([state, state_short])[[0, 2]], atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["efla", "delta"])
@pytest.mark.parametrize("use_output_gate", [False, True])
def test_padded_batch_matches_each_sequence_alone(mode, use_output_gate):
    torch.manual_seed(0)
    layer = EFLAttention(32, 2, mode=mode, use_output_gate=use_output_gate, chunk_size=4)
    T = 11
    x = torch.randn(3, T, 32)
    mask = _mask([(7, 4), (5, 0), (6, 2)], T)
    out = layer(x, mask)
    for b in range(3):
        real = mask[b].bool()
        alone = layer(x[b:b + 1, real])
        torch.testing.assert_close(out[b, real], alone[0], atol=ATOL, rtol=0)
        assert (out[b, ~real] == 0).all()


@pytest.mark.parametrize("mode", ["efla", "delta"])
def test_cached_steps_match_one_pass(mode):
    torch.manual_seed(0)
    layer = EFLAttention(32, 2, mode=mode, layer_idx=0, chunk_size=4)
    x = torch.randn(2, 13, 32)
    full = layer(x)
    cache = _linear_cache(1)
    steps = [layer(x[:, :6], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(6, 13)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=ATOL, rtol=0)


def test_modes_have_the_same_parameters():
    shapes = [{n: p.shape for n, p in EFLAttention(64, 4, mode=m).named_parameters()} for m in ("efla", "delta")]
    assert shapes[0] == shapes[1]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="mode"):
        EFLAttention(32, 2, mode="euler")
    with pytest.raises(ValueError, match="num_heads"):
        EFLAttention(30, 4)
    with pytest.raises(ValueError, match="layer_idx"):
        EFLAttention(32, 2)(torch.randn(1, 3, 32), cache=_linear_cache(1))


def test_softmax_attention_padding_and_cache():
    torch.manual_seed(0)
    layer = SoftmaxAttention(32, 2, layer_idx=0)
    T = 9
    x = torch.randn(2, T, 32)
    mask = _mask([(6, 3), (9, 0)], T)
    out = layer(x, mask)
    for b in range(2):
        real = mask[b].bool()
        torch.testing.assert_close(out[b, real], layer(x[b:b + 1, real])[0], atol=ATOL, rtol=0)
    cache_utils = pytest.importorskip("transformers.cache_utils")
    cache = cache_utils.DynamicCache()
    steps = [layer(x[:, :5], mask[:, :5], cache)] + [layer(x[:, t:t + 1], mask[:, :t + 1], cache) for t in range(5, T)]
    torch.testing.assert_close(torch.cat(steps, 1)[mask.bool()], out[mask.bool()], atol=ATOL, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (autocast runs the L2 norm in float32 there)")
@pytest.mark.parametrize("mode", ["efla", "delta"])
def test_bf16_autocast_on_cuda(mode):
    layer = EFLAttention(64, 2, mode=mode).cuda()
    x = torch.randn(2, 50, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    reference = layer(x)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - reference).norm() / reference.norm()).item() < 3e-2


def test_packed_documents_stay_packed():
    """With cu_seqlens each document is convolved on its own, and the projections see the packed tokens only (not
    every document padded to the longest: that multiplies a training step's activations)."""
    torch.manual_seed(0)
    conv = ShortConvolution(6, 4)
    lengths = [3, 9, 1, 2]
    x = torch.randn(1, sum(lengths), 6, requires_grad=True)
    cu_seqlens = torch.tensor([0, 3, 12, 13, 15], dtype=torch.int32)
    y, state = conv(x, cu_seqlens=cu_seqlens)
    alone = torch.cat([conv(piece)[0] for piece in torch.split(x, lengths, dim=1)], dim=1)
    torch.testing.assert_close(y, alone, atol=ATOL, rtol=0)
    assert state is None
    y.square().sum().backward()  # differentiable through the packing

    # the packed path's own backward: gradients equal those of each document convolved alone (float64), including
    # documents shorter than the kernel and a one-token sequence
    conv64 = ShortConvolution(6, 4).double()
    x64 = torch.randn(1, sum(lengths), 6, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(1, sum(lengths), 6, dtype=torch.float64)
    grads = torch.autograd.grad((conv64(x64, cu_seqlens=cu_seqlens)[0] * dy).sum(), (x64, conv64.weight))
    alone = torch.cat([conv64(piece)[0] for piece in torch.split(x64, lengths, dim=1)], dim=1)
    grads_alone = torch.autograd.grad((alone * dy).sum(), (x64, conv64.weight))
    for g, g_alone in zip(grads, grads_alone, strict=True):
        torch.testing.assert_close(g, g_alone, atol=1e-12, rtol=1e-12)

    layer = EFLAttention(32, 2, chunk_size=4)
    seen = []
    layer.q_proj.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    layer(torch.randn(1, 15, 32), cu_seqlens=cu_seqlens)
    assert seen == [torch.Size([1, 15, 32])]
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and end at T=15"):
        layer(torch.randn(1, 15, 32), cu_seqlens=torch.tensor([0, 3, 14], dtype=torch.int32))


@pytest.mark.parametrize("use_short_conv", [False, True])
def test_state_dict_with_fused_qkv_loads_into_the_separate_projections(use_short_conv):
    """A state dict saved before q, k, v were separated (fused qkv_proj [3C, C] and conv [3C, 1, W], q's channels
    first) loads with load_state_dict and gives the outputs of the fused computation."""
    torch.manual_seed(0)
    C, H, W = 32, 2, 4
    qkv = torch.randn(3 * C, C) / C**0.5
    conv = torch.randn(3 * C, 1, W)
    layer = EFLAttention(C, H, use_short_conv=use_short_conv, use_output_gate=True, chunk_size=4)
    old = {k: v for k, v in layer.state_dict().items() if not k.startswith(("q_", "k_", "v_"))}
    old["qkv_proj.weight"] = qkv
    if use_short_conv:
        old["conv.weight"] = conv
    layer.load_state_dict(old)  # strict: every new name is filled, no fused name is left over
    for i, name in enumerate("qkv"):
        assert torch.equal(getattr(layer, f"{name}_proj").weight, qkv[i * C:(i + 1) * C])
        if use_short_conv:
            assert torch.equal(getattr(layer, f"{name}_conv1d").weight, conv[i * C:(i + 1) * C])

    # the fused computation the old layer ran: one projection, one convolution over 3C channels, then split
    x = torch.randn(2, 9, C)
    fused = x @ qkv.t()
    if use_short_conv:
        fused_conv = ShortConvolution(3 * C, W)
        fused_conv.weight.data.copy_(conv)
        fused = fused_conv(fused)[0]
    else:
        fused = torch.nn.functional.silu(fused)
    q, k, v = (t.flatten(-2) for t in layer._qkv(x, None, None, None, keep_state=False)[:3])
    q_fused, k_fused, v_fused = fused.chunk(3, dim=-1)
    torch.testing.assert_close(q, torch.nn.functional.normalize(q_fused.unflatten(-1, (H, -1)), dim=-1).flatten(-2),
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat([k, v], -1), torch.cat([k_fused, v_fused], -1), atol=ATOL, rtol=0)
