"""Which parallelism a training runs, decided before the base loads: TRAIN_PARALLELISM.

  * `ddp`: data parallelism; every process holds the whole base (src/training/loop.py sums
    the LoRA gradients over the ranks);
  * `fsdp`: the frozen base sharded over each node's processes with FSDP2, replicated
    across nodes (src/training/sharding.py); the LoRA parameters and their AdamW state stay
    whole, in fp32, summed over the ranks as under `ddp`;
  * `auto` (the default): the memory plan decides. Data parallelism where the base and a
    forward pass fit one device (nothing is gathered, nothing waits), else the base sharded.

On a CPU memory does not decide (src/training/memory.py plans passes for speed there), so
`auto` is data parallelism. A 4-bit base (peft_method qlora) is never sharded: bitsandbytes'
Params4bit loses its quantisation state under FSDP2 and its CPU path rewrites the weights
in eval mode (bitsandbytes issue 1945, accelerate issue 3983); torchao's NF4Tensor shards
correctly and is the way to add sharded QLoRA later.
"""

import os
from dataclasses import dataclass, replace

import torch

from src.errors import UserInputError
from src.modeling import Placement
from src.training.distributed import World, least_over_ranks
from src.training.memory import (
    CPU_PLAN,
    GIB,
    PROCESS_GROUP_HEADROOM,
    ForwardPlan,
    MemoryModel,
    device_budget,
    memory_budget,
    memory_model_for,
    plan_forwards,
)

PARALLELISM_VARIABLE = "TRAIN_PARALLELISM"
CHOICES = ("auto", "ddp", "fsdp")
QLORA_NOT_SHARDED = (
    "a 4-bit base (peft_method qlora) is not sharded: bitsandbytes' Params4bit does not "
    "shard correctly under FSDP2 (bitsandbytes issue 1945)"
)


@dataclass(frozen=True)
class Parallelism:
    sharded: bool  # the base under FSDP2
    shards: int  # processes one copy of the base is spread over (1: whole on each)
    forwards: ForwardPlan  # the memory plan of each process
    reason: str

    def describe(self, processes: int) -> str:
        if processes == 1:
            what = "one process, the whole base on its device"
        elif self.sharded:
            what = f"FSDP2, the base sharded over {self.shards} processes"
            if processes > self.shards:
                what += f" and replicated {processes // self.shards}x across nodes (HSDP)"
        else:
            what = f"DDP (data parallel), the whole base on each of {processes} processes"
        return f"parallelism: {what}, because {self.reason}"


def wanted_parallelism() -> str:
    """TRAIN_PARALLELISM, checked."""
    wanted = os.environ.get(PARALLELISM_VARIABLE, "auto").strip().lower() or "auto"
    if wanted not in CHOICES:
        raise UserInputError(
            f"{PARALLELISM_VARIABLE} must be one of {', '.join(CHOICES)}, got "
            f"{os.environ[PARALLELISM_VARIABLE]!r}"
        )
    return wanted


def refuse_sharded_qlora(quantized: bool) -> None:
    """Before anything loads: TRAIN_PARALLELISM=fsdp with peft_method qlora."""
    if quantized and wanted_parallelism() == "fsdp":
        raise UserInputError(
            f"peft_method qlora with {PARALLELISM_VARIABLE}=fsdp: {QLORA_NOT_SHARDED}. Set "
            f"peft_method to lora to shard the base, or {PARALLELISM_VARIABLE} to ddp or auto"
        )


def choose_parallelism(
    wanted: str,
    model: MemoryModel,
    budget: int | None,
    processes: int,
    node_processes: int,
    longest: int,
    longest_validation: int = 0,
    cpu_plan: ForwardPlan | None = None,
) -> Parallelism:
    """The parallelism and the memory plan of each process. `budget`: each process's device
    memory (the least over the ranks), None on a CPU; `node_processes`: the processes of
    one node, what the base is sharded over. Raises UserInputError for what cannot fit."""
    can_shard = processes > 1 and node_processes > 1
    if budget is None:
        assert cpu_plan is not None
        if wanted == "fsdp" and processes > 1:
            lockstep = replace(cpu_plan, lockstep=True)
            return Parallelism(True, node_processes, lockstep, f"{PARALLELISM_VARIABLE}=fsdp")
        reason = (
            f"{PARALLELISM_VARIABLE}={wanted}"
            if wanted == "ddp"
            else "on a CPU the memory plan does not decide (auto)"
        )
        return Parallelism(False, 1, cpu_plan, reason)
    whole = f"the base and a pass fit one device ({budget / GIB:.1f} GiB)"
    if wanted == "ddp" or (wanted == "auto" and not can_shard):
        try:
            forwards = plan_forwards(model, budget, longest, longest_validation)
        except UserInputError as error:
            if can_shard and not model.quantized:
                raise UserInputError(
                    f"{error}; {PARALLELISM_VARIABLE}=fsdp (or auto) shards the base over the "
                    f"{node_processes} processes of a node"
                ) from None
            raise
        reason = f"{PARALLELISM_VARIABLE}=ddp" if wanted == "ddp" else whole
        return Parallelism(False, 1, forwards, reason)
    if wanted == "auto":
        try:
            return Parallelism(
                False, 1, plan_forwards(model, budget, longest, longest_validation), whole
            )
        except UserInputError as error:
            if model.quantized:
                raise UserInputError(
                    f"{error}. Sharding over the {node_processes} processes would not help: "
                    f"{QLORA_NOT_SHARDED}; set peft_method to lora to shard the base"
                ) from None
            too_large = str(error)
    else:
        if model.quantized:
            raise UserInputError(f"peft_method qlora: {QLORA_NOT_SHARDED}")
        too_large = None
    if processes == 1:  # as on a CPU: nothing to shard over
        forwards = plan_forwards(model, budget, longest, longest_validation)
        return Parallelism(False, 1, forwards, "one process: nothing to shard over")
    sharded = replace(model, shards=node_processes)  # 1 a node: replicated (HSDP), as on a CPU
    try:
        forwards = plan_forwards(sharded, budget, longest, longest_validation)
    except UserInputError as error:
        raise UserInputError(f"even sharded over {node_processes} processes, {error}") from None
    forwards = replace(forwards, lockstep=True)
    if too_large is None:
        reason = f"{PARALLELISM_VARIABLE}=fsdp"
    else:
        reason = (
            f"the base does not fit one device ({model.weights / GIB:.1f} GiB of weights, "
            f"{budget / GIB:.1f} GiB available), and its shard does "
            f"({sharded.weights / GIB:.1f} GiB with the layers gathered at a time)"
        )
    return Parallelism(True, node_processes, forwards, reason)


def plan_training(
    placement: Placement,
    model_config: dict,
    quantized: bool,
    lora_rank: int,
    longest: int,
    longest_validation: int,
    world: World,
) -> Parallelism:
    """The parallelism and memory plan of this training, the same on every rank: on GPUs
    from the least free memory over the ranks."""
    wanted = wanted_parallelism()
    model = memory_model_for(model_config, quantized, lora_rank)
    budget = None
    if placement.device.type == "cuda":
        budget = least_over_ranks(device_budget(placement, world.size), world, placement.device)
    return choose_parallelism(
        wanted, model, budget, world.size, world.local_size, longest, longest_validation,
        cpu_plan=CPU_PLAN,
    )  # fmt: skip


def may_shard(model_config: dict, quantized: bool, lora_rank: int, longest: int) -> bool:
    """Whether the workers may choose to shard, decided before they start (so that all of
    a machine's GPUs are started to hold the shards, whatever the rows of a step):
    TRAIN_PARALLELISM=fsdp, or auto where the whole base and a pass of the `longest` row
    would not fit the smallest GPU (its total memory, as no worker has started)."""
    wanted = wanted_parallelism()
    if wanted != "auto" or quantized:
        return wanted == "fsdp"
    gpus = torch.cuda.device_count()
    if gpus < 2:
        return False
    smallest = min(torch.cuda.get_device_properties(i).total_memory for i in range(gpus))
    model = memory_model_for(model_config, quantized, lora_rank)
    try:
        plan_forwards(model, memory_budget(smallest) - PROCESS_GROUP_HEADROOM, longest)
    except UserInputError:
        return True
    return False
