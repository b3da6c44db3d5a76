"""Data parallelism: which rank this process is, and summing gradients over the ranks.

With more than one process, every rank builds the same plan of optimizer steps (it depends on
the seed and the epoch only), takes its share of each step's rows, and the gradients are
summed over the ranks once per step. Each rank divides its loss by the supervised tokens of
the whole step, so the sum is exactly the gradient of the step, whatever the number of ranks.
"""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)  # rank 0 validates while the others wait


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_torchrun() -> World:
    """Join the process group that torchrun set up (NCCL on GPUs, gloo on CPUs)."""
    world = World(
        rank=int(os.environ["RANK"]),
        size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ["LOCAL_RANK"]),
    )
    if torch.cuda.is_available():
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
        # Bound to its device, NCCL sets up its communicator (and buffers) now, before the
        # memory plan reads what is free.
        dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    return world


def sum_over_ranks(tensors: list[torch.Tensor], world: World) -> None:
    """In-place sum of `tensors` over all ranks, in one collective through a flat buffer."""
    if world.size == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


def broadcast_flag(flag: bool, world: World, device: torch.device) -> bool:
    """Rank 0's `flag`, on every rank (a decision such as early stopping: all ranks follow it,
    so none waits in a collective the others have left)."""
    if world.size == 1:
        return flag
    tensor = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())
