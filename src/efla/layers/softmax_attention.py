"""``SoftmaxAttention``: causal multi-head softmax attention (SDPA) for the hybrid layers of an EFLA model.

It has no positional encoding: the recurrent layers around it already see token order (as in Jamba-style hybrids),
so it needs no position ids and left padding needs no position shift.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from efla.ops.varlen import document_index


class SoftmaxAttention(nn.Module):
    """Causal softmax attention over [B, T, hidden_size]; keys/values go to a transformers Cache when one is given."""

    def __init__(self, hidden_size: int, num_heads: int, layer_idx: int | None = None) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.head_dim, self.layer_idx = num_heads, hidden_size // num_heads, layer_idx
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Any | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states: [B, T, hidden_size]; attention_mask: [B, past + T] 0/1 over all tokens so far (0 =
        padding) or None; cache: a transformers Cache or None; cu_seqlens: [N + 1] cumulative lengths of documents
        packed along T (B = 1), each attending only within itself. Returns [B, T, hidden_size]."""
        B, T, _ = hidden_states.shape
        q, k, v = (proj(hidden_states).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        past = 0
        if cache is not None:
            past = cache.get_seq_length(self.layer_idx)
            k, v = cache.update(k, v, self.layer_idx)
        if cu_seqlens is not None:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=_document_mask(cu_seqlens, T))
        elif attention_mask is None and past == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(attention_mask, past, T, q.device))
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


def _causal_mask(attention_mask: torch.Tensor | None, past: int, T: int, device: torch.device) -> torch.Tensor:
    """Boolean [B or 1, 1, T, past + T]: query t (at position past + t) sees keys up to itself that are not padding.

    Every query also sees itself, so the rows of padded queries are not empty (their outputs are never used, but an
    all-masked row would make SDPA return NaN)."""
    query = torch.arange(past, past + T, device=device)[:, None]
    key = torch.arange(past + T, device=device)[None, :]
    allowed = key <= query
    if attention_mask is not None:
        if attention_mask.shape[-1] != past + T:
            raise ValueError(f"attention_mask must cover the {past} cached and {T} new tokens "
                             f"(got {attention_mask.shape[-1]} columns)")
        allowed = (allowed & attention_mask[:, None, None, :].bool()) | (key == query)
    return allowed if allowed.dim() == 4 else allowed[None, None]


def _document_mask(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """Boolean [1, 1, T, T]: causal and block-diagonal over the packed documents."""
    position = torch.arange(T, device=cu_seqlens.device)
    document = document_index(cu_seqlens, T)
    allowed = (position[None, :] <= position[:, None]) & (document[None, :] == document[:, None])
    return allowed[None, None]
