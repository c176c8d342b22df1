"""Bad arguments to efla_attention fail with a message that names the argument."""

import importlib

import pytest
import torch

from efla import efla_attention


def inputs(B=2, T=6, H=2, K=4, V=3):
    return (torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V), torch.rand(B, T, H))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: {**a, "k": a["k"][:, :, :, :3]}, "k must have q's shape"),
        (lambda a: {**a, "v": a["v"][:, :5]}, "v must be"),
        (lambda a: {**a, "beta": a["beta"][..., :1]}, "beta must be"),
        (lambda a: {**a, "q": a["q"][0]}, "q must be"),
        (lambda a: {**a, "v": a["v"].double()}, "share one dtype"),
        (lambda a: {**a, "beta": -a["beta"]}, "beta must be >= 0"),
        (lambda a: {**a, "beta": a["beta"].long()}, "beta must be a floating-point"),
        (lambda a: {**a, "initial_state": torch.zeros(2, 2, 3, 4)}, "initial_state must be"),
        (lambda a: {**a, "cu_seqlens": torch.tensor([0, 3, 6])}, "B must be 1"),
        (lambda a: {**a, "mode": "euler"}, "mode must be one of"),
        (lambda a: {**a, "backend": "cuda"}, "backend must be one of"),
        (lambda a: {**a, "chunk_size": 0}, "chunk_size"),
    ],
)
def test_errors_name_the_argument(change, match):
    q, k, v, beta = inputs()
    args = change({"q": q, "k": k, "v": v, "beta": beta})
    with pytest.raises((ValueError, TypeError), match=match):
        efla_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("beta"), **args)


def test_cu_seqlens_must_cover_the_sequence_and_not_decrease():
    q, k, v, beta = inputs(B=1, T=6)
    with pytest.raises(ValueError, match="end at T=6"):
        efla_attention(q, k, v, beta, cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="non-decreasing"):
        efla_attention(q, k, v, beta, cu_seqlens=torch.tensor([0, 5, 3, 6]))
    with pytest.raises(ValueError, match=r"initial_state must be .*number of sequences"):
        efla_attention(q, k, v, beta, cu_seqlens=torch.tensor([0, 3, 6]), initial_state=torch.zeros(1, 2, 4, 3))


def test_unchecked_beta_is_allowed_when_the_caller_opts_out():
    q, k, v, beta = inputs()
    o, _ = efla_attention(q, k, v, beta * 0.5, check_beta=False)
    assert torch.isfinite(o).all()


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: {**a, "cu_seqlens": [0, 6]}, TypeError, "cu_seqlens must be a torch.Tensor"),
        (lambda a: {**a, "initial_state": [[0.0]]}, TypeError, "initial_state must be a torch.Tensor"),
        (lambda a: {**a, "chunk_size": True}, ValueError, "chunk_size must be a positive int"),
        (lambda a: {**a, "scale": "a"}, TypeError, "scale must be a number"),
        (lambda a: {**a, "beta": a["beta"].index_fill(1, torch.tensor([2]), float("nan"))}, ValueError, "NaN"),
        (lambda a: {**a, "beta": a["beta"] / 0, "mode": "delta"}, ValueError, "finite in mode 'delta'"),
        (lambda a: {**a, "cu_seqlens_cpu": torch.tensor([0, 6])}, ValueError, "cu_seqlens_cpu must be a host copy"),
    ],
)
def test_more_errors_name_the_argument(change, error, match):
    q, k, v, beta = inputs(B=1)
    args = change({"q": q, "k": k, "v": v, "beta": beta})
    with pytest.raises(error, match=match):
        efla_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("beta"), **args)


@pytest.mark.parametrize("backend", ["recurrent", "torch"])
def test_no_tokens_give_empty_outputs_and_the_initial_state(backend):
    q, k, v, beta = inputs(T=0)
    h0 = torch.randn(2, 2, 4, 3, requires_grad=True)
    o, state = efla_attention(q, k, v, beta, initial_state=h0, output_final_state=True, backend=backend)
    assert o.shape == (2, 0, 2, 3)
    assert torch.equal(state, h0)
    state.sum().backward()
    assert torch.equal(h0.grad, torch.ones_like(h0))
    _, zeros = efla_attention(q, k, v, beta, output_final_state=True, cu_seqlens=None)
    assert zeros.shape == (2, 2, 4, 3) and not zeros.any()


def test_triton_backend_on_cpu_says_it_needs_a_gpu(monkeypatch):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    # import the kernels first: triton.jit chooses interpreter or compiler at import, and kernels imported without
    # TRITON_INTERPRET would need a GPU driver for every later test in this process
    importlib.import_module("efla.ops.triton.backend")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        efla_attention(*inputs(K=16, V=16), backend="triton")


def test_triton_backend_rejects_other_chunk_sizes():
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on the CPU the suite runs Triton's interpreter
    with pytest.raises(ValueError, match="64-token chunks"):
        efla_attention(*(x.to(device) for x in inputs(K=16, V=16)), backend="triton", chunk_size=32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (auto picks Triton only there)")
def test_auto_backend_runs_triton_chunks_whatever_chunk_size_says():
    """A model configured with small chunks for the CPU runs on a GPU: "auto" gives Triton its own chunk."""
    pytest.importorskip("triton")
    args = [x.cuda() for x in inputs(T=70, K=16, V=16)]
    o_auto, s_auto = efla_attention(*args, backend="auto", chunk_size=4, output_final_state=True)
    o_triton, s_triton = efla_attention(*args, backend="triton", output_final_state=True)
    torch.testing.assert_close(o_auto, o_triton, rtol=0, atol=0)
    torch.testing.assert_close(s_auto, s_triton, rtol=0, atol=0)


def test_fla_keywords_have_their_meaning():
    """use_qk_l2norm_in_kernel normalises q and k first; cu_seqlens_cpu only says where to read the lengths."""
    q, k, v, beta = inputs(B=1, T=9)
    o, _ = efla_attention(q, k, v, beta, use_qk_l2norm_in_kernel=True)
    o_ref, _ = efla_attention(torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1), v,
                              beta)
    torch.testing.assert_close(o, o_ref)
    cu = torch.tensor([0, 4, 9])
    o, _ = efla_attention(q, k, v, beta, cu_seqlens=cu, cu_seqlens_cpu=cu.clone())
    o_ref, _ = efla_attention(q, k, v, beta, cu_seqlens=cu)
    torch.testing.assert_close(o, o_ref)
