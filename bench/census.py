"""Operation census of a training pass as the GPU runs it, counted without a GPU.

    python -m bench.census                  # Llama-2-7B's shapes, one pass of 2,048 tokens
    python -m bench.census --size tiny      # the tests' tiny model (CI's smoke run)

The model is built on the meta device (no memory, no arithmetic) in bf16 with the training's
own LoRA (src/modeling.add_lora, rank 8 on the seven projections, dropout 0.05) and its loss
(src/training/loop.supervised_loss_sum), and one forward and backward pass runs under a
dispatch mode that records every ATen operation: its count (views and other metadata-only
operations launch no kernel and are not counted), the bytes it reads and writes, and the
FLOPs of the matmuls. Attention takes the GPU's varlen flash path, stood in for by one
operation each way with the flash kernel's FLOPs and bytes.

One decoder layer is the difference between a two-layer and a one-layer model, and the
embedding, head and loss what is left of the one-layer model. (The embeddings' output is
made to need a gradient, so that every layer counts as a middle one does: training skips
the gradient of the first layer's input.) The figures are a regression gate for the
training-speed work between GPU runs: fewer operations mean fewer launches and less Python
per pass, fewer non-matmul bytes less memory-bound time (costed at the card's bandwidth).
"""

import argparse
import contextlib
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

# Operations that only change a tensor's metadata (or make an empty one): no kernel runs.
NO_KERNEL = {
    "view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze",
    "slice", "select", "detach", "alias", "as_strided", "reshape", "split", "split_with_sizes",
    "unbind", "empty", "empty_like", "empty_strided", "new_empty", "lift_fresh", "_reshape_alias",
    "promote_types",
}  # fmt: skip
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul"}
SIZES = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000},
    "tiny": {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4,
             "num_key_value_heads": 4, "vocab_size": 32000},
}  # fmt: skip


@dataclass
class Census:
    """What one pass did: kernels by operation, bytes moved, matmul FLOPs."""

    operations: Counter = field(default_factory=Counter)
    matmul_flops: float = 0.0
    matmul_bytes: float = 0.0
    other_bytes: float = 0.0

    @property
    def kernels(self) -> int:
        return sum(self.operations.values())

    def minus(self, other: "Census") -> "Census":
        return Census(
            self.operations - other.operations,
            self.matmul_flops - other.matmul_flops,
            self.matmul_bytes - other.matmul_bytes,
            self.other_bytes - other.other_bytes,
        )

    def per_token(self, tokens: int) -> dict:
        return {
            "kernels": self.kernels,
            "matmul_flops_per_token": self.matmul_flops / tokens,
            "matmul_bytes_per_token": self.matmul_bytes / tokens,
            "other_bytes_per_token": self.other_bytes / tokens,
            "operations": dict(self.operations.most_common()),
        }


def _bytes(values) -> int:
    total = 0
    for value in values:
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, list | tuple):
            total += _bytes(value)
    return total


class Counting(TorchDispatchMode):
    def __init__(self, census: Census) -> None:
        super().__init__()
        self.census = census

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in NO_KERNEL:
            return out
        moved = _bytes(args) + _bytes(kwargs.values()) + _bytes([out])
        self.census.operations[name] += 1
        if name in MATMULS:
            self.census.matmul_flops += _matmul_flops(name, args, out)
            self.census.matmul_bytes += moved
        else:
            self.census.other_bytes += moved
        return out


def _matmul_flops(name: str, args: tuple, out: torch.Tensor) -> float:
    """2 x the multiply-adds: the output's elements times the contracted dimension."""
    left = args[1] if name in ("addmm", "baddbmm") else args[0]
    return 2.0 * out.numel() * left.shape[-1]


class _FlashStandIn(torch.autograd.Function):
    """The varlen flash kernel as one counted operation each way (causal: half the scores)."""

    census: "Census | None" = None
    lengths: tuple[int, ...] = ()  # the segments' (bounds on the meta device cannot be read)

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, scale=None):
        ctx.lengths = _FlashStandIn.lengths
        ctx.shape = q.shape
        with _disable_current_modes():
            out = torch.empty_like(q)
        _FlashStandIn._record("flash_attn_varlen_forward", q, ctx.lengths, 2.0, (q, k, v, out))
        return out

    @staticmethod
    def backward(ctx, grad):
        with _disable_current_modes():
            grads = [torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device) for _ in "qkv"]
        # the backward recomputes the scores: 2.5 times the forward's matmul work
        _FlashStandIn._record(
            "flash_attn_varlen_backward", grad, ctx.lengths, 5.0, (grad, *grads) * 2
        )
        return (*grads, None, None, None, None, None)

    @staticmethod
    def _record(name: str, like: torch.Tensor, lengths: list[int], factor: float, tensors) -> None:
        census = _FlashStandIn.census
        if census is None:
            return
        heads, dim = like.shape[1], like.shape[2]
        census.operations[name] += 1
        census.matmul_flops += factor * sum(n * n for n in lengths) * heads * dim  # causal half
        census.matmul_bytes += _bytes(tensors)


def flash_stand_in(q, k, v, cu_q, cu_k, max_q, max_k, scale=None):
    return _FlashStandIn.apply(q, k, v, cu_q, cu_k, max_q, max_k, scale)


def counted(name: str, function):
    """A compiled elementwise function (src/training/fused_elementwise.py) as the one kernel
    each way that inductor makes of it: forward, it reads its inputs and writes its outputs
    once; backward, it reads the incoming gradients and its inputs and writes their
    gradients once. (Inductor may recompute instead of reading saved values: the same
    bytes or fewer.)"""

    class StandIn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            with _disable_current_modes(), torch.enable_grad():
                inputs = [
                    a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                    for a in args
                ]
                outputs = function(*inputs)
            ctx.single = isinstance(outputs, torch.Tensor)
            ctx.inputs, ctx.outputs = inputs, (outputs,) if ctx.single else tuple(outputs)
            _record_fused(name, [*args, *ctx.outputs])
            with _disable_current_modes():
                results = tuple(o.detach() for o in ctx.outputs)
            return results[0] if ctx.single else results

        @staticmethod
        def backward(ctx, *grads):
            wanted = [a for a in ctx.inputs if isinstance(a, torch.Tensor) and a.requires_grad]
            with _disable_current_modes():
                found = iter(torch.autograd.grad(ctx.outputs, wanted, grads, allow_unused=True))
            result = [
                next(found) if isinstance(a, torch.Tensor) and a.requires_grad else None
                for a in ctx.inputs
            ]
            tensors = [a for a in ctx.inputs if isinstance(a, torch.Tensor)]
            _record_fused(
                f"{name}_backward", [*grads, *tensors, *(r for r in result if r is not None)]
            )
            return tuple(result)

    return StandIn.apply


def _record_fused(name: str, tensors) -> None:
    census = _FlashStandIn.census
    if census is not None:
        census.operations[f"fused_{name}"] += 1
        census.other_bytes += _bytes([t for t in tensors if isinstance(t, torch.Tensor)])


def counted_elementwise():
    from src.training.fused_elementwise import EAGER, TOKEN_DIMS, Elementwise

    return Elementwise("compiled", *(counted(n, getattr(EAGER, n)) for n in TOKEN_DIMS))


def model_on_meta(size: str, layers: int, fused: bool = True, compiled: bool = True):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from src import attention
    from src.modeling import add_lora

    config = LlamaConfig(**SIZES[size], num_hidden_layers=layers, max_position_embeddings=4096)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16, attn_implementation=attention.NAME
        )
    model.config.use_cache = False
    lora = add_lora(model, rank=8, alpha=16, dropout=0.05, quantized=False)
    model.enable_input_require_grads()  # every layer a middle one (see the docstring)
    if fused:
        from src.training.fused_lora import install_fused_lora

        install_fused_lora(lora)
    if compiled:
        from src.training.fused_elementwise import install_elementwise

        install_elementwise(lora, counted_elementwise())
    return lora


def count_pass(
    size: str, layers: int, segments: list[int], fused: bool = True, compiled: bool = True
) -> Census:
    """One training forward and backward over `segments`, every target supervised."""
    from src import attention
    from src.training.batching import MicroBatch
    from src.training.loop import supervised_loss_sum

    model = model_on_meta(size, layers, fused, compiled)
    model.train()
    tokens = sum(segments)
    positions = torch.cat([torch.arange(n) for n in segments])
    batch = MicroBatch(
        input_ids=torch.zeros(1, tokens, dtype=torch.long),
        position_ids=positions[None],
        targets=torch.zeros(1, tokens, dtype=torch.long),
        supervised_positions=torch.arange(tokens),
        supervised_targets=torch.zeros(tokens, dtype=torch.long),
        num_targets=tokens,
        num_real_tokens=tokens,
        segment_lengths=tuple(segments),
    )
    census = Census()
    _FlashStandIn.census, _FlashStandIn.lengths = census, tuple(segments)
    gpu_path = (
        mock.patch.object(attention, "varlen_supported", lambda query: True),
        mock.patch.object(attention, "causal_varlen_kernel", lambda: flash_stand_in),
    )
    try:
        with gpu_path[0], gpu_path[1], Counting(census):
            supervised_loss_sum(model, batch, torch.device("meta")).backward()
    finally:
        _FlashStandIn.census = None
    return census


def measure(
    size: str = "7b", tokens: int = 2048, segments: int = 4, fused: bool = True,
    compiled: bool = True,
) -> dict:  # fmt: skip
    """The census of one decoder layer and of the rest (embedding, head, loss); `fused`:
    the training's fused LoRA forward (src/training/fused_lora.py), else peft's; `compiled`:
    the layer's elementwise work compiled (src/training/fused_elementwise.py, the GPU's
    default), else transformers' eager layer."""
    lengths = [tokens // segments] * segments
    one = count_pass(size, 1, lengths, fused, compiled)
    two = count_pass(size, 2, lengths, fused, compiled)
    layer, rest = two.minus(one), one.minus(two.minus(one))
    return {
        "size": size,
        "lora_forward": "fused" if fused else "peft",
        "elementwise": "compiled" if compiled else "eager",
        "tokens": tokens,
        "segments": segments,
        "decoder_layer": layer.per_token(tokens),
        "embedding_head_loss": rest.per_token(tokens),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="7b")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--peft", action="store_true", help="peft's own LoRA forward")
    parser.add_argument("--eager", action="store_true", help="transformers' eager layers")
    args = parser.parse_args()
    with contextlib.redirect_stdout(sys.stderr):  # the training's log lines: stdout is JSON
        census = measure(args.size, args.tokens, fused=not args.peft, compiled=not args.eager)
    print(json.dumps(census, indent=2))


if __name__ == "__main__":
    main()
