"""The training's processes: which rank this one is, and what the ranks do together.

With more than one process, every rank builds the same plan of optimizer steps (it depends on
the seed and the epoch only), takes its share of each step's rows, and the LoRA gradients are
summed over the ranks once per step. Each rank divides its loss by the supervised tokens of
the whole step, so the sum is exactly the gradient of the step, whatever the number of ranks.

Collectives time out after COLLECTIVE_TIMEOUT (60 s; gloo's default is 30 minutes): every
rank runs the same passes in lockstep (src/training/loop.py), so a rank that waits longer is
waiting for one that failed or was stopped, on this node or another. The waits that may last
longer (one rank per node preparing the data, loading a base) go through `wait_for_all`, a
gloo group of their own with a long timeout.
"""

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
LONG_WAIT_TIMEOUT = datetime.timedelta(hours=2)  # preparing the data, loading the base
TIMEOUT_VARIABLE = "TRAIN_COLLECTIVE_TIMEOUT_S"


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1  # processes on this node
    node: int = 0  # torchrun's GROUP_RANK
    long_waits: Any = field(default=None, compare=False, repr=False)  # the long-timeout group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return self.size // self.local_size


def init_from_torchrun() -> World:
    """Join the process group that torchrun set up (NCCL on GPUs, gloo on CPUs)."""
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    timeout = collective_timeout()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        # Bound to its device, NCCL sets up its communicator (and buffers) now, before the
        # memory plan reads what is free.
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return World(
        rank=rank,
        size=size,
        local_rank=int(os.environ["LOCAL_RANK"]),
        local_size=local_size,
        node=int(os.environ.get("GROUP_RANK", rank // local_size)),
        long_waits=dist.new_group(backend="gloo", timeout=LONG_WAIT_TIMEOUT),
    )


def collective_timeout() -> datetime.timedelta:
    configured = os.environ.get(TIMEOUT_VARIABLE)
    if not configured:
        return COLLECTIVE_TIMEOUT
    try:
        seconds = float(configured)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_VARIABLE} must be a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


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


def most_over_ranks(value: int, world: World, device: torch.device) -> int:
    """The largest of every rank's `value`."""
    if world.size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def least_over_ranks(value: int, world: World, device: torch.device) -> int:
    return -most_over_ranks(-value, world, device)


def broadcast_flag(flag: bool, world: World, device: torch.device) -> bool:
    """Rank 0's `flag`, on every rank (a decision such as early stopping: all ranks follow it,
    so none waits in a collective the others have left)."""
    if world.size == 1:
        return flag
    tensor = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def wait_for_all(world: World, value: Any = None) -> list[Any]:
    """Every rank's `value` (picklable), by rank, once all ranks got here: for the waits that
    may last longer than a collective's timeout (the long-timeout gloo group)."""
    if world.size == 1:
        return [value]
    values: list[Any] = [None] * world.size
    dist.all_gather_object(values, value, group=world.long_waits)
    return values
