"""The loaded adapters' LoRA weights stacked into fixed slots, for the batched decode step.

In a decode step every row may use another adapter (src/serving/batch_step.py). peft applies
one adapter at a time, each projection on its own (a cast of the input to fp32, two thin
matmuls, a scale, an add and a cast back). Here the adapters the step may use sit side by
side in slots of one buffer per group of projections, so that one step computes every row's
own update in a few kernels:

    shrunk = x @ [A of every slot, every projection of the group]^T   (one matmul)
    out_i += select(shrunk for projection i, the row's slot) @ [B_i of every slot]^T

`select` keeps a row's own slot's columns and puts exact zeros in the others, so a row's
update is its adapter's and nothing of another's (a select, not a product: whatever another
adapter computes never reaches it). Projections that read the same input (q, k and v; gate
and up) share the input's cast and the shrink, as training's fused LoRA does
(src/training/fused_lora.py); each B carries its layer's scale (alpha / rank: 2 by default,
a power of two, so folding it in rounds nothing), and the update goes into the base output
in place.

The branch computes in fp32, as peft's (the adapters' dtype), not in the activations' bf16 as
training's fused forward does: served tokens are held to the trained model's logits within
what bf16 itself costs (tests/serving/test_batch_step.py), and a bf16 branch overshot that
bound by 7 to 9% on the tests' adapters. The input's fp32 copy is a few kilobytes a step.

The buffers have a fixed number of slots (as many as adapters have run at once: a step reads
every slot), so a CUDA graph captured over them stays valid while adapters come and go:
loading one writes its weights into a free slot in place, or into the slot of one no running
row uses. Only one more adapter running at once than there are slots, a rank beyond the
widest, or an adapter on projections the stack does not cover builds the buffers anew
(`version` changes; the step graphs go; src/serving/scheduler.py decides).
"""

from dataclasses import dataclass, field

import torch
from peft.tuners.lora import LoraLayer

# Projections of a Llama decoder layer that read the same input, in the step's order.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


@dataclass
class StackedGroup:
    """The LoRA projections of one group (same input) of one layer, over every slot."""

    names: tuple[str, ...]  # the adapted projections of the group, in GROUPS order
    modules: tuple[LoraLayer, ...]
    shrink: torch.Tensor  # (projections * slots * rank, in): each slot's A, zero-padded
    expands: tuple[torch.Tensor, ...]  # per projection (out, slots * rank): scale * B
    round_update_first: bool  # 4-bit base layers: peft casts the update before the add

    def add_updates(
        self, outputs: dict[str, torch.Tensor], x: torch.Tensor, select: torch.Tensor
    ) -> None:
        """Each row's own adapter's update into the base `outputs` (in place)."""
        rows = x.shape[0] * x.shape[1]
        width = self.expands[0].shape[1]
        wide = x.reshape(rows, -1).to(self.shrink.dtype)  # once for the group, as peft casts
        shrunk = (wide @ self.shrink.t()).view(rows, len(self.names), width)
        shrunk = torch.where(select[:, None, :], shrunk, 0.0)
        for index, name in enumerate(self.names):
            out = outputs[name].view(rows, -1)
            if out.dtype == shrunk.dtype:
                out.addmm_(shrunk[:, index], self.expands[index].t())
                continue
            update = shrunk[:, index] @ self.expands[index].t()
            # peft's 4-bit layer rounds the update to the output's dtype before adding it;
            # its plain one adds in fp32 and rounds the sum: an in-place add of the fp32
            # update into the bf16 output does just that
            out.add_(update.to(out.dtype) if self.round_update_first else update)

    def write_slot(self, slot: int, rank_capacity: int, adapter: str | None) -> None:
        """The adapter's weights into `slot` (None: zeros)."""
        start, stop = slot * rank_capacity, (slot + 1) * rank_capacity
        slots_width = self.expands[0].shape[1]
        for index, module in enumerate(self.modules):
            rows = slice(index * slots_width + start, index * slots_width + stop)
            self.shrink[rows].zero_()
            self.expands[index][:, start:stop].zero_()
            if adapter is None or adapter not in module.lora_A:
                continue
            lora_a = module.lora_A[adapter].weight  # (r, in)
            lora_b = module.lora_B[adapter].weight  # (out, r)
            rank = lora_a.shape[0]
            self.shrink[rows][:rank].copy_(lora_a)
            scaled = lora_b.float() * module.scaling[adapter]
            self.expands[index][:, start : start + rank].copy_(scaled)


@dataclass
class LayerStack:
    """The groups of one decoder layer (None: no projection of that group adapted)."""

    groups: dict[tuple[str, ...], StackedGroup | None]


@dataclass
class AdapterStack:
    """Slots of adapters for the batched decode step; `slot_of` maps adapter names to them."""

    capacity: int  # slots
    rank_capacity: int  # the largest rank a slot holds
    layers: list[LayerStack]
    head: StackedGroup | None  # lm_head, where an adapter adapts it
    slot_of: dict[str, int] = field(default_factory=dict)
    version: int = 0

    @classmethod
    def build(
        cls,
        model: torch.nn.Module,
        capacity: int,
        rank_capacity: int,
        dtype: torch.dtype = torch.float32,
    ) -> "AdapterStack":
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        device = causal_lm.get_input_embeddings().weight.device
        layers = []
        for layer in causal_lm.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            owners = {**dict.fromkeys(GROUPS[0] + GROUPS[1], attention),
                      **dict.fromkeys(GROUPS[2] + GROUPS[3], mlp)}  # fmt: skip
            groups = {}
            for group in GROUPS:
                named = [(n, getattr(owners[n], n)) for n in group]
                groups[group] = _group(named, capacity, rank_capacity, dtype, device)
            layers.append(LayerStack(groups))
        head = _group([("lm_head", causal_lm.lm_head)], capacity, rank_capacity, dtype, device)
        return cls(capacity, rank_capacity, layers, head)

    def groups(self) -> list[StackedGroup]:
        found = [g for layer in self.layers for g in layer.groups.values() if g is not None]
        return found + ([self.head] if self.head is not None else [])

    def covers(self, model: torch.nn.Module, adapter: str) -> bool:
        """Whether a slot can hold `adapter`: its rank fits, its projections are stacked."""
        stacked = {id(m) for g in self.groups() for m in g.modules}
        for module in model.modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                if id(module) not in stacked:
                    return False
                if module.lora_A[adapter].weight.shape[0] > self.rank_capacity:
                    return False
        return True

    def assign(self, adapter: str, keep: set[str]) -> int:
        """A slot for `adapter` (its weights written there), taking a free one, else one of
        an adapter outside `keep` (those the running rows use)."""
        if adapter in self.slot_of:
            return self.slot_of[adapter]
        taken = set(self.slot_of.values())
        free = [s for s in range(self.capacity) if s not in taken]
        if not free:
            spare = [name for name in self.slot_of if name not in keep]
            if not spare:
                raise RuntimeError(f"all {self.capacity} adapter slots are in use")
            free = [self.slot_of.pop(spare[0])]
        slot = free[0]
        with torch.no_grad():
            for group in self.groups():
                group.write_slot(slot, self.rank_capacity, adapter)
        self.slot_of[adapter] = slot
        return slot

    def release(self, adapter: str) -> None:
        """The adapter's slot becomes free (its weights stay until another is written)."""
        self.slot_of.pop(adapter, None)

    def selection(self, slots: torch.Tensor) -> torch.Tensor:
        """(rows, slots * rank) bool: the columns of each row's slot (-1: none)."""
        columns = torch.arange(self.capacity * self.rank_capacity, device=slots.device)
        return (columns // self.rank_capacity)[None, :] == slots[:, None]


def _group(
    named: list[tuple[str, torch.nn.Module]],
    capacity: int,
    rank_capacity: int,
    dtype: torch.dtype,
    device: torch.device,
) -> StackedGroup | None:
    adapted = [(name, module) for name, module in named if isinstance(module, LoraLayer)]
    if not adapted:
        return None
    width = capacity * rank_capacity
    features = [(m.base_layer.in_features, m.base_layer.out_features) for _, m in adapted]
    shrink = torch.zeros(len(adapted) * width, features[0][0], dtype=dtype, device=device)
    expands = tuple(torch.zeros(out, width, dtype=dtype, device=device) for _, out in features)
    names = tuple(name for name, _ in adapted)
    four_bit = [_four_bit(module) for _, module in adapted]
    assert len(set(four_bit)) == 1, "a group of projections is all 4-bit or none"
    return StackedGroup(names, tuple(m for _, m in adapted), shrink, expands, four_bit[0])


def _four_bit(module: torch.nn.Module) -> bool:
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # no bitsandbytes: no 4-bit layers
        return False
    return isinstance(module, Linear4bit)


def largest_rank(model: torch.nn.Module) -> int:
    """The largest LoRA rank of any adapter loaded in `model` (0: none)."""
    ranks = [
        lora_a.weight.shape[0]
        for module in model.modules()
        if isinstance(module, LoraLayer)
        for lora_a in module.lora_A.values()
    ]
    return max(ranks, default=0)
