"""Data parallelism applied from outside the model (torchtitan's rule): the model code stays single-device.

`torchrun --nproc_per_node N -m hlsa.cli train ...` sets `WORLD_SIZE/RANK/LOCAL_RANK`; we then join a process group
(NCCL on GPUs, gloo on CPUs) and wrap the model with DDP or FSDP2 (`fully_shard` per block, then the root).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device: str) -> World:
    """Join the process group that torchrun describes in the environment; a single process needs none."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(requested: str, world: World) -> torch.device:
    """`auto` = this rank's GPU when CUDA exists, else the CPU (`requested` is one of `options.DEVICES`, checked
    against the machine by `hlsa.loading.pick_device`)."""
    from hlsa.loading import pick_device as machine_device

    if machine_device(requested).type == "cpu":
        return torch.device("cpu")
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


def parallelize(model: nn.Module, mode: str, world: World, device: torch.device) -> nn.Module:
    """Wrap `model` for `world.size > 1`: `ddp` or `fsdp2`; returns the module to call in the loop."""
    if world.size <= 1:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # broadcast_buffers=False: the LTE controller's num_kept is a per-rank EMA that the controller itself
        # averages across ranks every update; DDP's default would overwrite it with rank 0's at every forward.
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"train.parallel must be ddp or fsdp2 (got {mode!r})")


def all_mean(values: list[float], world: World, device: torch.device) -> list[float]:
    """Average a few scalars over ranks (one collective)."""
    if world.size <= 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / world.size).tolist()


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank when it is true on one (so all ranks stop at the same step)."""
    if world.size <= 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: object, world: World) -> list[object]:
    """Every rank's `obj`, in rank order (all ranks receive the list)."""
    if world.size <= 1:
        return [obj]
    out: list[object] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def broadcast_params_equal(model: nn.Module) -> None:
    """Under DDP the initial weights come from rank 0 (DDP does it); FSDP2 shards rank-local tensors, so make the
    unsharded initial weights identical first."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    with torch.no_grad():
        for t in list(model.parameters()) + [b for b in model.buffers() if b is not None]:
            dist.broadcast(t, src=0)
