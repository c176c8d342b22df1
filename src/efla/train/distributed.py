"""Process groups and parallel wrappers, applied to a plain model from the outside (torchtitan style).

Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set) the process group uses NCCL on CUDA and gloo on CPU; a plain
``python`` run is world size 1 and never initialises a group. ``ddp`` replicates the model with DDP; ``fsdp`` shards
it with FSDP2: ``fully_shard`` on every block (``model.model.layers``), then on the root.

Context parallelism (``context_parallel`` C > 1) arranges the ranks as a 2-D device mesh ("data", "context") of
shape (world size / C, C): the C ranks of one data group read the same rows and each takes its contiguous slice of
them along T (``context_shard``). DDP and FSDP2 still span ALL ranks (the flattened mesh), which is exact without any
extra reduction: every rank's loss is its token-loss SUM over the step's global target count times the world size,
so the average that DDP / FSDP2 take over the world is the sum over all tokens of the global batch divided by that
count, i.e. the data-parallel mean of the context-summed gradients, the gradient of the one-process run. FSDP2 thus
also shards parameters and optimizer state over the context ranks (as with the data ranks).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from efla.device import resolve_device
from efla.models.context_parallel import apply_context_parallel, context_parallel_group


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place: rank, world size, the device it computes on, and its coordinates on the (data, context)
    mesh: ``context_size`` ranks share each data group's rows (``context_group``: those ranks; None when 1)."""

    rank: int
    size: int
    device: torch.device
    context_size: int = 1
    context_group: dist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        return self.rank // self.context_size

    @property
    def data_size(self) -> int:
        return self.size // self.context_size

    @property
    def context_rank(self) -> int:
        return self.rank % self.context_size


def init_world(device: str = "auto", context_parallel: int = 1) -> World:
    """Join the torchrun process group if there is one and pick this rank's device (efla.device.resolve_device:
    "auto" is cuda:LOCAL_RANK when CUDA is available, else cpu; "cuda" is cuda:LOCAL_RANK). With ``context_parallel``
    C > 1 the ranks form the device mesh ("data", "context") of shape (size / C, C); rank r is at (r // C, r % C)."""
    rank, size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if size % context_parallel:
        raise ValueError(f"context_parallel {context_parallel} must divide the world size {size} (the number of "
                         "processes): change --context-parallel or --nproc_per_node")
    chosen = resolve_device(device, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if size > 1 and not dist.is_initialized():
        # rank 0 may tokenise a large corpus while the others wait at a barrier
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    if context_parallel == 1:
        return World(rank, size, chosen)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(chosen.type, (size // context_parallel, context_parallel),
                            mesh_dim_names=("data", "context"))
    return World(rank, size, chosen, context_parallel, mesh["context"].get_group())


def context_shard(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's contiguous slice along T (the last dimension) of a [B, T] batch tensor shared by its context
    group: T split into ``context_size`` parts, the first T % context_size of them one longer."""
    if world.context_size == 1:
        return tensor
    return tensor.tensor_split(world.context_size, dim=-1)[world.context_rank]


def close_world() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def sum_over_ranks(value: torch.Tensor, world: World) -> torch.Tensor:
    """The sum of a tensor over all ranks."""
    if world.size > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def any_rank(flag: bool, world: World) -> bool:
    """True when ``flag`` is True on at least one rank (e.g. a signal that reached only some ranks)."""
    if world.size == 1:
        return flag
    value = torch.tensor([float(flag)], device=world.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def from_main(value: Any, world: World) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object, e.g. a decision only rank 0 could make)."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def parallelize(model: nn.Module, strategy: str, world: World, compile_blocks: bool) -> nn.Module:
    """Optionally compile each block, set the context-parallel group (``world.context_group``), then wrap for data
    parallelism over all ranks (nothing to wrap on one process; see the module docstring for why that is exact under
    context parallelism).

    The blocks are the entries of ``model.model.layers`` (the decoder layers of a transformers causal LM). The
    returned module's state dict keeps the plain model's names (DDP's ``module.`` prefix is handled by the
    torch.distributed.checkpoint state-dict helpers)."""
    blocks = list(_blocks(model))
    if compile_blocks:
        for block in blocks:
            block.compile()
    if world.context_size > 1 and context_parallel_group(apply_context_parallel(model, world.context_group)) is None:
        raise ValueError(f"context_parallel {world.context_size} needs a model with EFLA layers; "
                         f"{type(model).__name__} has none")
    if world.size == 1:
        return model
    if strategy == "ddp":
        device_ids = [world.device.index] if world.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (``model.model.layers``, the layout of efla's and transformers' models)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers: cannot compile or shard it block by block")
    return layers
