"""Bad arguments to efla_attention fail with a message that names the argument."""

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
