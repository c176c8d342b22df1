"""Where packed documents start, from what transformers' padding-free collators pass to a model.

``DataCollatorWithFlattening`` concatenates a batch into one row and marks the documents with ``position_ids`` that
restart (at ``position_ids_start``, 0 by default) for every document and, with ``return_flash_attn_kwargs=True``, with
FlashAttention's ``cu_seq_lens_q`` / ``cu_seq_lens_k``. EFLA layers take the documents as ``cu_seqlens`` (cumulative
lengths), so that no recurrent state, convolution or attention crosses from one document into the next.
"""

from __future__ import annotations

import torch


def cu_seqlens_from_collator(
    position_ids: torch.Tensor | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The documents as int32 ``cu_seqlens`` [N + 1] over the flattened tokens, or None when nothing marks them.

    cu_seq_lens_q (or cu_seq_lens_k): taken as they are, no host sync. position_ids [B, T]: a document starts at
    each row's start and wherever a position is not the previous one plus 1; rows are read one after the other
    (flattened to B * T tokens). Finding the starts from positions copies their count to the host (one sync);
    prefer the collator's ``return_flash_attn_kwargs=True`` on accelerators.
    """
    given = cu_seq_lens_q if cu_seq_lens_q is not None else cu_seq_lens_k
    if given is not None:
        if given.dim() != 1:
            raise ValueError(f"cu_seq_lens_q must be 1-D cumulative lengths (got shape {tuple(given.shape)})")
        return given.to(torch.int32)
    if position_ids is None:
        return None
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [batch, length] (got shape {tuple(position_ids.shape)})")
    B, T = position_ids.shape
    flat = position_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1] + 1
    starts[::T] = True
    bounds = torch.cat([starts.nonzero().flatten(), flat.new_full((1,), B * T)])
    return bounds.to(torch.int32)
