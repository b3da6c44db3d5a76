"""LoRA's training forward in the activation dtype, added into the base output in place.

peft's LoRA layer computes `base(x) + B(A(dropout(x.float()))) * scale`: every input is
copied to fp32 (the adapter's dtype) and back, the dropout, the two thin matmuls, the scale
and the add are separate kernels, and autograd keeps an fp32 copy of each input for the
backward. On the training's hot path (bf16 on a GPU) that is a quarter of a step's time
(bench/census.py counts the kernels and bytes). Here one autograd function per projection
does the work in the input's dtype:

    out = base(x);  out += scale * (dropout(x) @ A^T) @ B^T    (addmm_, in place)

A and B stay fp32 parameters (the optimizer's master weights); the function casts them, a
few kilobytes, to the input's dtype and returns fp32 gradients. Projections that read the
same input (q, k and v; gate and up: `SharedInput`) shrink it once, by their stacked A
matrices, in one matmul each way (`SharedShrink`), and each adds its part into its own
output (`LoraExpand`); the others (o, down) run `LoraUpdate`, the same in one function. The
input is saved once, with its dropout mask in one byte a value; peft saved a four-byte copy
of the input and of its dropout per projection.

Dropout is peft's, each element kept with probability 1 - p and scaled by 1 / (1 - p),
with one deliberate difference: one mask per input, shared by the projections that read it
(peft draws one per projection). Such a training is therefore not bit-identical to one
through peft's forward; with dropout 0 the loss and the gradients agree within the
activation dtype's rounding (tests/training/test_fused_lora.py).

The fused forward runs while the model trains (module.training, gradients on). Validation,
the validation_prompt answers and predict.py run peft's own forward, one implementation for
what is validated and what is served. TRAIN_FUSED_LORA=0 makes training run peft's forward
too (today's path, for comparison, and a way out). peft still owns the adapter: its
modules, names and saved files are unchanged. Written here because neither peft nor
Liger-Kernel has a LoRA linear that accumulates into the base output.
"""

import functools
import types
from typing import Any

import torch
from peft.tuners.lora import LoraLayer

from src.inputs import switch_on
from src.log import log

ENABLE_VARIABLE = "TRAIN_FUSED_LORA"  # "0": peft's own forward in training too


def fused_lora_enabled() -> bool:
    return switch_on(ENABLE_VARIABLE)


def dropout_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """Which elements dropout keeps, each with probability 1 - p: a bool tensor of `like`'s
    shape (one kernel; kept for the backward in 1 byte a value, half of bf16's)."""
    return torch.empty(like.shape, dtype=torch.bool, device=like.device).bernoulli_(1 - p)


def scaled_mm(left: torch.Tensor, right: torch.Tensor, factor: float) -> torch.Tensor:
    """`factor * left @ right` in one GEMM: addmm with beta 0 never reads its (empty) input,
    and the scale rides in the GEMM's alpha instead of a kernel of its own."""
    return torch.addmm(left.new_empty(()), left, right, beta=0, alpha=factor)


class LoraUpdate(torch.autograd.Function):
    """`out += scale * (dropout(x) @ A^T) @ B^T` in place, in x's dtype, with the gradients
    of x, A and B (fp32, as A and B are). With dropout, (x * mask) @ A^T is computed and
    the 1 / (1 - p) goes into the scale: one multiplication less each way."""

    @staticmethod
    def forward(
        ctx: Any,
        out: torch.Tensor,  # (..., out_features): the base layer's output, overwritten
        x: torch.Tensor,  # (..., in_features)
        lora_a: torch.Tensor,  # (r, in_features)
        lora_b: torch.Tensor,  # (out_features, r)
        scale: float,
        p: float,
    ) -> torch.Tensor:
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        inputs = x.reshape(-1, x.shape[-1])
        mask = dropout_mask(inputs, p) if p > 0 else None
        masked = inputs * mask if mask is not None else inputs
        shrunk = masked @ a.t()  # (N, r)
        factor = scale / (1 - p)
        out.view(-1, out.shape[-1]).addmm_(shrunk, b.t(), alpha=factor)
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, mask, shrunk, a, b)
        ctx.factor = factor
        ctx.dtypes = (lora_a.dtype, lora_b.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        x, mask, shrunk, a, b = ctx.saved_tensors
        a_dtype, b_dtype = ctx.dtypes
        grads = grad_out.reshape(-1, grad_out.shape[-1]).to(a.dtype)
        grad_shrunk = scaled_mm(grads, b, ctx.factor)  # (N, r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[3]:
            grad_b = scaled_mm(grads.t(), shrunk, ctx.factor).to(b_dtype)
        if ctx.needs_input_grad[2]:
            inputs = x.reshape(-1, x.shape[-1])
            masked = inputs * mask if mask is not None else inputs
            grad_a = (grad_shrunk.t() @ masked).to(a_dtype)
        if ctx.needs_input_grad[1]:
            grad_inputs = grad_shrunk @ a
            if mask is not None:
                grad_inputs.mul_(mask)
            grad_x = grad_inputs.view(x.shape)
        return grad_out, grad_x, grad_a, grad_b, None, None


class SharedShrink(torch.autograd.Function):
    """`dropout(x) @ [A_1; ...; A_n]^T` for the projections that read the same input: one
    mask, one matmul each way, in x's dtype; returns each projection's (N, r_i) part."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float, *lora_as: torch.Tensor) -> tuple:
        stacked = torch.cat(lora_as).to(x.dtype)  # (sum r, in_features): one cast
        inputs = x.reshape(-1, x.shape[-1])
        mask = dropout_mask(inputs, p) if p > 0 else None
        masked = inputs * mask if mask is not None else inputs
        shrunk = masked @ stacked.t()  # (N, sum r)
        ctx.save_for_backward(x, mask, stacked)
        ctx.ranks = [a.shape[0] for a in lora_as]
        ctx.dtype = functools.reduce(torch.promote_types, (a.dtype for a in lora_as))  # cat's
        return tuple(shrunk.split(ctx.ranks, dim=1))

    @staticmethod
    def backward(ctx: Any, *grad_parts: torch.Tensor) -> tuple:
        x, mask, stacked = ctx.saved_tensors
        grads = torch.cat(
            [
                g if g is not None else x.new_zeros(x.numel() // x.shape[-1], r)
                for g, r in zip(grad_parts, ctx.ranks, strict=True)
            ],
            dim=1,
        ).to(stacked.dtype)  # (N, sum r)
        grad_x = None
        grad_as: list[torch.Tensor | None] = [None] * len(ctx.ranks)
        if any(ctx.needs_input_grad[2:]):
            inputs = x.reshape(-1, x.shape[-1])
            masked = inputs * mask if mask is not None else inputs
            grad_stacked = (grads.t() @ masked).to(ctx.dtype)  # (sum r, in_features)
            grad_as = list(grad_stacked.split(ctx.ranks))
        if ctx.needs_input_grad[0]:
            grad_inputs = grads @ stacked
            if mask is not None:
                grad_inputs.mul_(mask)
            grad_x = grad_inputs.view(x.shape)
        return grad_x, None, *grad_as


class LoraExpand(torch.autograd.Function):
    """`out += factor * shrunk @ B^T` in place (a projection's share of a SharedShrink)."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, shrunk: torch.Tensor, lora_b: torch.Tensor,
                factor: float) -> torch.Tensor:  # fmt: skip
        b = lora_b.to(shrunk.dtype)
        out.view(-1, out.shape[-1]).addmm_(shrunk, b.t(), alpha=factor)
        ctx.mark_dirty(out)
        ctx.save_for_backward(shrunk, b)
        ctx.factor, ctx.b_dtype = factor, lora_b.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        shrunk, b = ctx.saved_tensors
        grads = grad_out.reshape(-1, grad_out.shape[-1]).to(b.dtype)
        grad_shrunk = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_shrunk = scaled_mm(grads, b, ctx.factor)
        if ctx.needs_input_grad[2]:
            grad_b = scaled_mm(grads.t(), shrunk, ctx.factor).to(ctx.b_dtype)
        return grad_out, grad_shrunk, grad_b, None


class SharedInput:
    """The LoRA layers that read one input (q, k and v; gate and up): the first of them to
    see an input shrinks it for all, the others take their part of that (the same tensor:
    transformers' Llama passes one `hidden_states` to each)."""

    def __init__(self, layers: list[LoraLayer]) -> None:
        self.layers = layers
        self.input: torch.Tensor | None = None
        self.parts: tuple[torch.Tensor, ...] = ()
        self.taken = 0

    def part(self, layer: LoraLayer, x: torch.Tensor, adapter: str, p: float) -> torch.Tensor:
        if self.input is not x or self.taken == len(self.layers):
            lora_as = [member.lora_A[adapter].weight for member in self.layers]
            self.input, self.parts, self.taken = x, SharedShrink.apply(x, p, *lora_as), 0
        self.taken += 1
        part = self.parts[self.layers.index(layer)]
        if self.taken == len(self.layers):  # all served: hold no reference past this pass
            self.input, self.parts = None, ()
        return part

    def serves(self, layer: LoraLayer, adapter: str, p: float) -> bool:
        """Whether the group can shrink for `layer`: the same adapter and dropout on all."""
        return all(
            adapter in member.lora_A
            and adapter in member.active_adapters
            and _dropout_p(member, adapter) == p
            for member in self.layers
        )


SHARED_INPUTS = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})


def _dropout_p(layer: LoraLayer, adapter: str) -> float:
    dropout = layer.lora_dropout[adapter]
    return float(getattr(dropout, "p", 0.0)) if dropout.training else 0.0


def fused_forward(self: LoraLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A peft LoRA layer's forward: fused while training, peft's own otherwise."""
    if not (self.training and torch.is_grad_enabled()) or not _plain_lora(self, kwargs):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    group: SharedInput | None = getattr(self, "_shared_input", None)
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        p = _dropout_p(self, name)
        if group is not None and group.serves(self, name, p):
            factor = self.scaling[name] / (1 - p)
            shrunk = group.part(self, x, name, p)
            result = LoraExpand.apply(result, shrunk, self.lora_B[name].weight, factor)
        else:
            result = LoraUpdate.apply(
                result, x, self.lora_A[name].weight, self.lora_B[name].weight,
                self.scaling[name], p,
            )  # fmt: skip
    return result


def _plain_lora(layer: LoraLayer, kwargs: dict) -> bool:
    """What the fused forward computes exactly: unmerged LoRA without a variant (DoRA) or
    mixed adapters per row."""
    return not (
        layer.disable_adapters
        or layer.merged
        or kwargs.get("adapter_names") is not None
        or any(name in layer.lora_variant for name in layer.active_adapters)
    )


def install_fused_lora(model: torch.nn.Module) -> int:
    """Give every LoRA layer of `model` the fused training forward; returns how many. A
    variant it does not compute (DoRA) is refused here, not run slowly in silence."""
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if any(getattr(layer, "lora_variant", None) for layer in layers):  # before any change
        raise ValueError("the fused LoRA forward computes plain LoRA only, not DoRA")
    for layer in layers:
        layer.forward = types.MethodType(fused_forward, layer)
    groups = _group_shared_inputs(model)
    log(
        f"LoRA: fused training forward in the activation dtype on {len(layers)} layers, "
        f"{groups} groups sharing one input shrink it once ({ENABLE_VARIABLE}=0 for peft's own)"
    )
    return len(layers)


def _group_shared_inputs(model: torch.nn.Module) -> int:
    """Mark q/k/v and gate/up of each block as reading one input; returns the groups."""
    count = 0
    for block in model.modules():
        children = {name: m for name, m in block.named_children() if isinstance(m, LoraLayer)}
        for names in SHARED_INPUTS:
            if names <= children.keys():
                group = SharedInput([children[n] for n in sorted(names)])
                for member in group.layers:
                    member._shared_input = group
                count += 1
    return count


def choose_lora_forward(model: torch.nn.Module) -> str:
    """The training's LoRA forward: fused unless TRAIN_FUSED_LORA=0; the log says which.
    Returns "fused" or "peft"."""
    if fused_lora_enabled():
        install_fused_lora(model)
        return "fused"
    log(f"LoRA: peft's own forward ({ENABLE_VARIABLE}=0)")
    return "peft"


def remove_fused_lora(model: torch.nn.Module) -> None:
    """Back to peft's own forward on every LoRA layer (benchmarks compare the two)."""
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            vars(layer).pop("forward", None)
            vars(layer).pop("_shared_input", None)
