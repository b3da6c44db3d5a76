"""The loss's vocabulary projection and cross-entropy as one autograd function that keeps
only the gradient of its input, computed chunk by chunk in the forward pass.

Through autograd, `F.cross_entropy(head(states).float(), targets)` keeps an fp32
log-softmax of every supervised position for the backward pass: 4 bytes times the
32,000-word vocabulary, 128 KB per token, more than one 7B decoder layer keeps. Here each
chunk of positions is projected, reduced to its loss and turned at once into the gradient
of its hidden states, `(softmax(logits) - onehot(target)) @ W`, and only that gradient
(hidden-size values in the activation dtype: 8 KB per token for 7B) is kept; the backward
pass scales it by the incoming gradient. The arithmetic is F.cross_entropy's on the same
logits (fp32 from the activation dtype's matmul): in fp32 it agrees to rounding, in bf16
the kept gradient is rounded once before its scale instead of after
(tests/training/test_fused_loss.py). The head is frozen (LoRA trains the decoder's
projections), so no weight gradient is computed.

It is the idea of Liger-Kernel's fused linear cross-entropy and torchtune's chunked loss,
written in torch operations rather than a Triton kernel: it runs on every device the
training does, including the CPU the tests run on, and torch.compile can trace it.

TRAIN_FUSED_LOSS=0 computes the loss as before, through autograd chunk by chunk
(`chunked_cross_entropy_sum`: the same sum, an fp32 log-softmax kept per supervised token),
for comparison and as a way out; the memory plan counts what that keeps.
"""

from typing import Any

import torch
import torch.nn.functional as F

from src.inputs import switch_on
from src.log import log

ENABLE_VARIABLE = "TRAIN_FUSED_LOSS"  # "0": autograd's cross-entropy, chunk by chunk

CHUNK = 1024  # positions per slice of the vocabulary projection: (1024, 32000) fp32 = 131 MB


class LinearCrossEntropy(torch.autograd.Function):
    """Sum over positions of cross_entropy(states @ W^T, targets); keeps d(sum)/d(states)."""

    @staticmethod
    def forward(
        ctx: Any,
        states: torch.Tensor,  # (T, H), the activation dtype
        weight: torch.Tensor,  # (V, H), the head's, frozen
        targets: torch.Tensor,  # (T,) int64
        chunk: int,
    ) -> torch.Tensor:
        precision = torch.promote_types(states.dtype, torch.float32)  # fp32, fp64 for checks
        total = torch.zeros((), dtype=precision, device=states.device)
        grad_states = torch.empty_like(states) if ctx.needs_input_grad[0] else None
        for start in range(0, states.shape[0], chunk):
            logits = (states[start : start + chunk] @ weight.t()).to(precision)  # (chunk, V)
            labels = targets[start : start + chunk]
            norm = torch.logsumexp(logits, dim=-1)
            total += (norm - logits.gather(1, labels[:, None]).squeeze(1)).sum()
            if grad_states is not None:
                probs = logits.sub_(norm[:, None]).exp_()  # softmax, in place of the logits
                probs.scatter_add_(1, labels[:, None], probs.new_full((len(labels), 1), -1.0))
                grad_states[start : start + chunk] = probs.to(states.dtype) @ weight
        ctx.save_for_backward(grad_states)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple:
        (grad_states,) = ctx.saved_tensors
        return grad_states * grad_total.to(grad_states.dtype), None, None, None


def fused_loss_enabled() -> bool:
    return switch_on(ENABLE_VARIABLE)


def describe_loss() -> str:
    """The training's loss, in the log; returns "fused" or "autograd"."""
    if fused_loss_enabled():
        log(
            f"Loss: the vocabulary projection and cross-entropy fused ({ENABLE_VARIABLE}=0: "
            "autograd's)"
        )
        return "fused"
    log(f"Loss: autograd's cross-entropy, chunk by chunk ({ENABLE_VARIABLE}=0)")
    return "autograd"


def training_loss_sum(
    states: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor
) -> torch.Tensor:
    """The training's loss sum: fused unless TRAIN_FUSED_LOSS=0."""
    if fused_loss_enabled():
        return cross_entropy_sum(states, head, targets)
    return chunked_cross_entropy_sum(states, head, targets)


def chunked_cross_entropy_sum(
    states: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk: int = CHUNK
) -> torch.Tensor:
    """The same sum through autograd: each chunk's logits in fp32 and F.cross_entropy."""
    total = torch.zeros((), dtype=torch.float32, device=states.device)
    for start in range(0, states.shape[0], chunk):
        logits = head(states[start : start + chunk]).float()
        total = total + F.cross_entropy(logits, targets[start : start + chunk], reduction="sum")
    return total


def cross_entropy_sum(
    states: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk: int = CHUNK
) -> torch.Tensor:
    """Sum of the cross-entropy of `head(states)` against `targets` (fp32 scalar); the
    gradient of `states` is kept only where autograd will need it."""
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise TypeError(f"the loss projects through a plain linear head, not {type(head)}")
    if head.weight.requires_grad:
        raise ValueError("the fused loss keeps no gradient for the head: it must be frozen")
    if torch.is_grad_enabled() and states.requires_grad:
        return LinearCrossEntropy.apply(states, head.weight, targets, chunk)
    with torch.no_grad():
        return LinearCrossEntropy.apply(states.detach(), head.weight, targets, chunk)
