"""LoRA's training forward in the activation dtype, added into the base output in place.

peft's LoRA layer computes `base(x) + B(A(dropout(x.float()))) * scale`: every input is
copied to fp32 (the adapter's dtype) and back, the dropout, the two thin matmuls, the scale
and the add are separate kernels, and autograd keeps an fp32 copy of each input for the
backward. On the training's hot path (bf16 on a GPU) that is a quarter of a step's time
(bench/census.py counts the kernels and bytes). Here one autograd function per projection
does the work in the input's dtype:

    out = base(x);  out += scale * (dropout(x) @ A^T) @ B^T    (addmm_, in place)

A and B stay fp32 parameters (the optimizer's master weights); the function casts them, a
few kilobytes, to the input's dtype and returns fp32 gradients. It saves the input (shared
by the projections that read it: q, k and v; gate and up) and, with dropout, its mask in
the input's dtype; peft saved a four-byte copy of the input and of its dropout per
projection.

Dropout keeps peft's meaning: an independent mask per projection, each element kept with
probability 1 - p and scaled by 1 / (1 - p). Only the random stream differs, so a training
with dropout is not bit-identical to one through peft; with dropout 0 the loss and the
gradients agree within the activation dtype's rounding (tests/training/test_fused_lora.py).

The fused forward runs while the model trains (module.training, gradients on). Validation,
the validation_prompt answers and predict.py run peft's own forward, one implementation for
what is validated and what is served. TRAIN_FUSED_LORA=0 makes training run peft's forward
too (today's path, for comparison, and a way out). peft still owns the adapter: its
modules, names and saved files are unchanged. Written here because neither peft nor
Liger-Kernel has a LoRA linear that accumulates into the base output.
"""

import os
import types
from typing import Any

import torch
from peft.tuners.lora import LoraLayer

from src.log import log

ENABLE_VARIABLE = "TRAIN_FUSED_LORA"  # "0": peft's own forward in training too


def fused_lora_enabled() -> bool:
    value = os.environ.get(ENABLE_VARIABLE, "1").strip().lower()
    if value not in ("0", "1", "false", "true", "no", "yes", ""):
        raise ValueError(f"{ENABLE_VARIABLE} must be 0 or 1, got {value!r}")
    return value not in ("0", "false", "no")


def dropout_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """Which elements dropout keeps, each with probability 1 - p: ones and zeros in `like`'s
    dtype (one kernel; multiplying by it needs no type promotion)."""
    return torch.empty_like(like).bernoulli_(1 - p)


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
        grad_shrunk = (grads @ b).mul_(ctx.factor)  # (N, r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[3]:
            grad_b = (grads.t() @ shrunk).to(b_dtype).mul_(ctx.factor)
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


def fused_forward(self: LoraLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A peft LoRA layer's forward: fused while training, peft's own otherwise."""
    if not (self.training and torch.is_grad_enabled()) or not _plain_lora(self, kwargs):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        dropout = self.lora_dropout[name]
        p = float(getattr(dropout, "p", 0.0)) if dropout.training else 0.0
        result = LoraUpdate.apply(
            result, x, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], p
        )
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
    log(
        f"LoRA: fused training forward in the activation dtype on {len(layers)} layers "
        f"({ENABLE_VARIABLE}=0 for peft's own)"
    )
    return len(layers)


def choose_lora_forward(model: torch.nn.Module) -> None:
    """The training's LoRA forward: fused unless TRAIN_FUSED_LORA=0; the log says which."""
    if fused_lora_enabled():
        install_fused_lora(model)
    else:
        log(f"LoRA: peft's own forward ({ENABLE_VARIABLE}=0)")


def remove_fused_lora(model: torch.nn.Module) -> None:
    """Back to peft's own forward on every LoRA layer (benchmarks compare the two)."""
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            vars(layer).pop("forward", None)
