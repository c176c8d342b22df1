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



def test_packed_short_conv_continues_each_sequence_from_its_state():
    """Packed sequences (cu_seqlens) with one state each, including sequences shorter than the kernel and an empty
    one: outputs and final states equal each sequence continued alone, in float64, and so do the gradients."""
    torch.manual_seed(0)
    conv = ShortConvolution(6, 4).double()
    lengths = [5, 2, 0, 1, 7]
    cu_seqlens = torch.tensor([0, 5, 7, 7, 8, 15], dtype=torch.int32)
    x = torch.randn(1, sum(lengths), 6, dtype=torch.float64, requires_grad=True)
    states = torch.randn(len(lengths), 6, 3, dtype=torch.float64, requires_grad=True)
    y, final = conv(x, states, cu_seqlens)
    pieces = torch.split(x, lengths, dim=1)
    alone = [conv(piece, states[n:n + 1]) if len(piece[0]) else (piece, states[n:n + 1])  # empty: state unchanged
             for n, piece in enumerate(pieces)]
    torch.testing.assert_close(y, torch.cat([a[0] for a in alone], 1), atol=1e-12, rtol=0)
    torch.testing.assert_close(final, torch.cat([a[1] for a in alone]), atol=0, rtol=0)
    dy, dfinal = torch.randn_like(y), torch.randn_like(final)
    grads = torch.autograd.grad((y * dy).sum() + (final * dfinal).sum(), (x, states, conv.weight))
    y_alone, final_alone = torch.cat([a[0] for a in alone], 1), torch.cat([a[1] for a in alone])
    grads_alone = torch.autograd.grad((y_alone * dy).sum() + (final_alone * dfinal).sum(), (x, states, conv.weight))
    for g, g_alone in zip(grads, grads_alone, strict=True):
        torch.testing.assert_close(g, g_alone, atol=1e-12, rtol=1e-12)


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


@pytest.mark.parametrize("gated", [False, True])
def test_modes_have_the_same_parameters(gated):
    shapes = [{n: p.shape for n, p in EFLAttention(64, 4, mode=m, use_decay_gate=gated).named_parameters()}
              for m in ("efla", "delta")]
    assert shapes[0] == shapes[1]
    if gated:
        assert {"a_proj.weight", "A_log", "dt_bias"} <= shapes[0].keys() and shapes[0]["A_log"] == (4,)


def _gated_layer_by_hand(layer: EFLAttention, x: torch.Tensor) -> torch.Tensor:
    """The gated layer's output from its weights in float64, one token at a time: projections, causal depthwise
    convolution + SiLU, L2 norms, beta, g = -exp(A_log) softplus(W_a x + dt_bias), the gated step with alpha and
    eta written out (mode "delta": both beta), the per-head RMSNorm and o_proj."""
    w = {n: p.detach().double() for n, p in layer.named_parameters()}
    x = x.double()
    B, T, _ = x.shape
    H, D = layer.num_heads, layer.head_dim
    W = w["q_conv1d.weight"].shape[-1]

    def features(name: str) -> torch.Tensor:
        p = torch.nn.functional.pad(x @ w[f"{name}_proj.weight"].T, (0, 0, W - 1, 0))  # zeros before the start
        conv = sum(p[:, j:j + T] * w[f"{name}_conv1d.weight"][:, 0, j] for j in range(W))
        return torch.nn.functional.silu(conv).view(B, T, H, D)

    q, k, v = features("q"), features("k"), features("v")
    q = q / (q.square().sum(-1, keepdim=True) + 1e-6).sqrt()  # fla's L2 norm
    if layer.mode == "delta":
        k = k / (k.square().sum(-1, keepdim=True) + 1e-6).sqrt()
    beta = torch.sigmoid(x @ w["b_proj.weight"].T)
    g = -w["A_log"].exp() * torch.nn.functional.softplus(x @ w["a_proj.weight"].T + w["dt_bias"])
    S = torch.zeros(B, H, D, D, dtype=torch.float64)
    out = []
    for t in range(T):
        k_t, v_t, b_t, g_t = k[:, t], v[:, t], beta[:, t, :, None], g[:, t, :, None]
        lam = k_t.square().sum(-1, keepdim=True)
        if layer.mode == "delta":
            alpha = eta = b_t
        else:
            alpha = -torch.expm1(-b_t * lam) / lam
            eta = -b_t * torch.expm1(-(b_t * lam - g_t)) / (b_t * lam - g_t)
        S = g_t.exp()[..., None] * S
        update = eta * v_t - alpha * torch.einsum("bhkv,bhk->bhv", S, k_t)
        S = S + k_t[..., :, None] * update[..., None, :]
        out.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]) * D**-0.5)
    o = torch.stack(out, 1)
    normed = o / (o.square().mean(-1, keepdim=True) + layer.o_norm.eps).sqrt() * w["o_norm.weight"]
    return o, normed.flatten(-2) @ w["o_proj.weight"].T


@pytest.mark.parametrize("mode", ["efla", "delta"])
def test_gated_layer_equals_the_step_by_step_computation(mode):
    """The decay-gated layer (gated EFLA / Gated DeltaNet) against a float64 computation from its weights, with
    decays from weak to strong (A up to 16) and a cache continuing the sequence: the attention output (the norm's
    input) to float64 round-off, the layer's output to the float32 RMSNorm's."""
    torch.manual_seed(0)
    layer = EFLAttention(32, 2, mode=mode, use_decay_gate=True, layer_idx=0, chunk_size=4).double()
    with torch.no_grad():
        layer.o_norm.weight.uniform_(0.5, 1.5)
        layer.a_proj.weight.mul_(20)  # rates from far below to far above dt_bias: weak and strong decay
    seen = []
    layer.o_norm.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    attended, expected = _gated_layer_by_hand(layer, x)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    out = layer(x)
    assert rel(seen[-1], attended) < 1e-12 and rel(out, expected) < 1e-6
    cache = _linear_cache(1)
    steps = [layer(x[:, :6], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(6, 11)]
    assert rel(torch.cat(seen[-6:], 1), attended) < 1e-12 and rel(torch.cat(steps, 1), expected) < 1e-6


def test_decay_gate_initialisation():
    """Gated DeltaNet's: A = exp(A_log) uniform in [1, 16], softplus(dt_bias) = dt in [1e-3, 1e-1]; so g < 0."""
    layer = EFLAttention(64, 64, use_decay_gate=True)
    A, dt = layer.A_log.exp(), torch.nn.functional.softplus(layer.dt_bias)
    assert (A >= 1).all() and (A <= 16).all() and A.std() > 1
    assert (dt >= 1e-3 * (1 - 1e-5)).all() and (dt <= 1e-1 * (1 + 1e-5)).all() and dt.max() / dt.min() > 5
    assert layer.A_log._no_weight_decay and layer.dt_bias._no_weight_decay


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
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("mode", ["efla", "delta"])
def test_bf16_autocast_on_cuda(mode, gated):
    layer = EFLAttention(64, 2, mode=mode, use_decay_gate=gated).cuda()
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
    assert state.shape == (len(lengths), 6, 3)
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
    q, k, v = (t.flatten(-2) for t in layer._qkv(x, None, None, keep_state=False)[:3])
    q_fused, k_fused, v_fused = fused.chunk(3, dim=-1)
    torch.testing.assert_close(q, torch.nn.functional.normalize(q_fused.unflatten(-1, (H, -1)), dim=-1).flatten(-2),
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat([k, v], -1), torch.cat([k_fused, v_fused], -1), atol=ATOL, rtol=0)
