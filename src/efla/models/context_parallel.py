"""Context parallelism for an EFLA model, applied from outside: ``apply_context_parallel(model, group)`` makes every
EFLA layer split its sequences along T over ``group`` (``efla.layers.attention``), each rank then passing the model
its contiguous shard of the tokens (rank r the tokens after rank r - 1's; any lengths, 0 included) and, for packed
documents, the GLOBAL cu_seqlens (B = 1).

The loss under context parallelism:

- Next-token targets cross rank boundaries: the last position of a shard predicts the first label of the next
  non-empty shard. ``EFLAForCausalLM`` forms them from the shard's ``labels`` with ``sharded_next_token_targets``
  (one all-gather of each rank's first labels); a caller that already holds targets shifted over the whole sequence
  passes their shard as ``shift_labels`` instead.
- Each rank's loss is the sum of its token losses over the GLOBAL count of counted targets (``global_target_count``:
  one all-reduce, unless num_items_in_batch is given), so the sum of the ranks' losses is the single-process mean,
  and the gradients summed over the ranks (an all-reduce with SUM, not the mean) are its gradients. Sum the ranks'
  losses (all-reduce) to log the loss of the whole sequence.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from efla.layers import EFLAttention, SoftmaxAttention
from efla.models.loss import IGNORE_INDEX


def apply_context_parallel(model: nn.Module, group: dist.ProcessGroup | None) -> nn.Module:
    """Set ``group`` (e.g. ``dist.group.WORLD``, or a mesh's context dimension) as the context-parallel group of every
    EFLA layer of ``model`` (None: turn context parallelism off); returns the model. Softmax attention layers (hybrid
    models, ``config.attn_layers``) have no context parallelism: a model holding any raises ValueError."""
    softmax = [module.layer_idx for module in model.modules() if isinstance(module, SoftmaxAttention)]
    if softmax and group is not None:
        raise ValueError(f"context parallelism does not support softmax attention layers (attn_layers {softmax}): "
                         "use a model without attn_layers")
    for module in model.modules():
        if isinstance(module, EFLAttention):
            module.cp_group = group
    return model


def context_parallel_group(model: nn.Module) -> dist.ProcessGroup | None:
    """The context-parallel group of ``model``'s EFLA layers (``apply_context_parallel``), None without."""
    return next((module.cp_group for module in model.modules() if isinstance(module, EFLAttention)), None)


def sharded_next_token_targets(labels: torch.Tensor, cu_seqlens: torch.Tensor | None,
                               group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's shard [B, T_r] of the next-token targets of sequences split along T over ``group``, from its shard
    of the labels [B, T_r] (the input ids themselves, -100 ignored): position t predicts label t + 1, the shard's last
    position the first label of the next non-empty shard; a sequence's last position, and with cu_seqlens (the
    GLOBAL [N + 1] offsets, B = 1) the position before each document's start, predict nothing (-100). One all-gather
    of every rank's length and first labels."""
    B, T = labels.shape
    first = labels[:, 0] if T else labels.new_full((B,), IGNORE_INDEX)
    mine = torch.cat([labels.new_tensor([T]), first])
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    rank = dist.get_rank(group)
    later = [row[1:] for row in gathered[rank + 1:] if row[0] > 0]
    following = later[0] if later else labels.new_full((B,), IGNORE_INDEX)
    targets = torch.cat([labels[:, 1:], following[:, None]], dim=1) if T else labels.clone()
    if cu_seqlens is not None:
        start = sum(int(row[0]) for row in gathered[:rank])
        ends = [x - 1 - start for x in cu_seqlens[1:-1].tolist() if start < x <= start + T]
        targets = targets.flatten().index_fill(0, torch.tensor(ends, dtype=torch.long, device=labels.device),
                                               IGNORE_INDEX).view_as(labels)
    return targets


def global_target_count(targets: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The number of counted targets (not -100) over the ranks of ``group``: the loss's denominator."""
    count = (targets != IGNORE_INDEX).sum()
    dist.all_reduce(count, group=group)
    return count

