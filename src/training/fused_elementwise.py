"""The elementwise work of each Llama decoder layer in fused kernels while it trains.

transformers' eager Llama layer runs RMSNorm as seven kernels (an fp32 copy, a square, a
mean, an add, a reciprocal square root, two products), the rotary embedding as a dozen
(halves, a negation, a concatenation, four products and two sums for q and k), SwiGLU as
two and each residual add as one, each reading and writing whole activations, and as many
again backward (bench/census.py counts them: a sixth of a 7B step's time on an H200). Here
the decoder layer's training forward is the same arithmetic in four pure functions,

    rms_norm(x)  ->  attention(q, k = rotary(q, k))  ->  add_rms_norm(x, update)
        ->  down(swiglu(gate, up))  ->  x + update

and on a GPU each is compiled by torch.compile (inductor: one Triton kernel forward and
one backward). Nothing new is depended on; torch.compile traces them whole (no graph
breaks) with the number of tokens marked dynamic, so one compilation per function serves
every layer and every packing of the rows. Liger-Kernel's Triton kernels do the same work
by hand, but attach by replacing transformers' module-level functions for every model in
the process, and would put triton into the CPU runtime's requirements.

Compiled where they run: `TRAIN_COMPILE` = `auto` (default: on CUDA), `1` (wherever the
training runs, the CPU tests included) or `0` (transformers' eager layer, for comparison
and as a way out). Before the training, one pass (forward and backward, at a pass's length
up to 2,048 tokens) runs through the model as it will train, compiling every graph its
steps use; if that fails (no compiler for the device, a GPU triton does not support), the
layers run eagerly and the log says why. The fused forward runs while the
model trains with gradients on; validation, the validation_prompt answers and predict.py
run transformers' own layer. Activation checkpointing works on the fused forward as
transformers' GradientCheckpointingLayer does on its own (the layer keeps its input only
and runs again in backward), so the memory plan's checkpointed passes stay checkpointed.
"""

import types
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    eager_attention_forward,
    rotate_half,
)

from src.attention import PackedSegments
from src.base_model import keep_compiler_caches_out_of_tmp
from src.inputs import auto_switch
from src.log import log

ENABLE_VARIABLE = "TRAIN_COMPILE"  # auto | 1 | 0
PROBE_TOKENS = 2048  # at most, in the probe's pass (its size hint for inductor)


def compile_setting() -> str:
    """`auto`, `1` or `0`, from TRAIN_COMPILE (unset: auto)."""
    return auto_switch(ENABLE_VARIABLE)


# The arithmetic of transformers' LlamaRMSNorm, apply_rotary_pos_emb and LlamaMLP's
# activation, as pure functions of tensors (what torch.compile fuses).


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = hidden.dtype
    wide = hidden.to(torch.float32)
    wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return weight * wide.to(dtype)


def add_rms_norm(
    residual: torch.Tensor, update: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual sum and its RMSNorm, in one pass over the sum."""
    total = residual + update
    return total, rms_norm(total, weight, eps)


def rotary(
    query: torch.Tensor,  # (1, H, N, D)
    key: torch.Tensor,  # (1, H_kv, N, D)
    cos: torch.Tensor,  # (1, N, D)
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@dataclass(frozen=True)
class Elementwise:
    """The four functions a decoder layer's training forward calls, and what runs them."""

    how: str  # "compiled" or "eager"
    rms_norm: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    swiglu: Callable[..., torch.Tensor]


EAGER = Elementwise("eager", rms_norm, add_rms_norm, rotary, swiglu)

# Which dimension of each tensor argument counts the tokens (marked dynamic for compile).
TOKEN_DIMS = {
    "rms_norm": (1,),
    "add_rms_norm": (1, 1),
    "rotary": (2, 2, 1, 1),
    "swiglu": (1, 1),
}


def _fresh_copy(function: Callable) -> Callable:
    """The function with a code object of its own: torch.compile keeps its compilations on
    the code object, at most `recompile_limit` (8) of them, and past that a fullgraph
    function raises. A copy per training gives each training the whole limit, so what an
    earlier training in this process compiled (another dtype, another base) cannot make
    this one fail in its middle."""
    copy = types.FunctionType(
        function.__code__.replace(), function.__globals__, function.__name__,
        function.__defaults__, function.__closure__,
    )  # fmt: skip
    copy.__kwdefaults__ = function.__kwdefaults__
    return copy


def _compiled(name: str, function: Callable) -> Callable:
    compiled = torch.compile(_fresh_copy(function), fullgraph=True)
    dims = TOKEN_DIMS[name]

    def call(*args: Any) -> Any:
        for tensor, dim in zip(args, dims, strict=False):
            torch._dynamo.maybe_mark_dynamic(tensor, dim)
        return compiled(*args)

    call.__name__ = f"compiled_{name}"
    return call


def compiled_elementwise() -> Elementwise:
    """The four functions through torch.compile (compiled lazily, at their first call)."""
    keep_compiler_caches_out_of_tmp()
    return Elementwise(
        "compiled",
        *(_compiled(name, getattr(EAGER, name)) for name in TOKEN_DIMS),
    )


def probe(model: torch.nn.Module, device: torch.device, tokens: int) -> None:
    """One training forward and backward of `tokens` tokens through the model as it will
    train (its layers installed, its adapter's projections, frozen norms): torch.compile
    compiles here every graph the training's steps use (gradients or none on the first
    layer's input, on q and on k, as the adapter's targets make them), so a device that
    cannot compile fails before the training, not inside it, and a step compiles nothing
    more. The random state is left as it was (LoRA dropout draws here); no gradient stays.
    `tokens` gives inductor its size hint (a GPU autotunes at it): a pass's length."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    was_training = model.training
    model.train()
    ids = torch.arange(tokens, device=device).remainder(causal_lm.config.vocab_size)[None]
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            hidden = causal_lm.model(
                input_ids=ids,
                position_ids=torch.arange(tokens, device=device)[None],
                packed_segments=PackedSegments.of((tokens,), device),
                use_cache=False,
            ).last_hidden_state
            hidden.float().sum().backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def fused_layer_forward(
    self: LlamaDecoderLayer,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cache: Any = None,
    use_cache: bool | None = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """A Llama decoder layer's forward: fused while training, transformers' otherwise."""
    if not (self.training and torch.is_grad_enabled()) or cache is not None:
        return type(self).forward(
            self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs,
        )  # fmt: skip
    body = partial(_fused_layer, self, attention_mask=attention_mask, position_ids=position_ids,
                   position_embeddings=position_embeddings, **kwargs)  # fmt: skip
    if self.gradient_checkpointing:
        # What transformers' GradientCheckpointingLayer does for the class's own forward
        # (which this instance attribute replaces): the layer keeps only its input and runs
        # again in backward.
        return self._gradient_checkpointing_func(body, hidden_states)
    return body(hidden_states)


def _fused_layer(
    self: LlamaDecoderLayer,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    **kwargs: Any,
) -> torch.Tensor:
    kernels: Elementwise = self._elementwise
    first, second = self.input_layernorm, self.post_attention_layernorm
    normed = kernels.rms_norm(hidden_states, first.weight, first.variance_epsilon)
    update = _attention(self.self_attn, normed, position_embeddings, attention_mask, kernels,
                        position_ids=position_ids, **kwargs)  # fmt: skip
    hidden, normed = kernels.add_rms_norm(
        hidden_states, update, second.weight, second.variance_epsilon
    )
    mlp = self.mlp
    update = mlp.down_proj(kernels.swiglu(mlp.gate_proj(normed), mlp.up_proj(normed)))
    return hidden + update


def _attention(
    attention: torch.nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    attention_mask: torch.Tensor | None,
    kernels: Elementwise,
    **kwargs: Any,
) -> torch.Tensor:
    """transformers' LlamaAttention.forward without a cache, the rotary embedding fused."""
    input_shape = hidden.shape[:-1]
    hidden_shape = (*input_shape, -1, attention.head_dim)
    query = attention.q_proj(hidden).view(hidden_shape).transpose(1, 2)
    key = attention.k_proj(hidden).view(hidden_shape).transpose(1, 2)
    value = attention.v_proj(hidden).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = kernels.rotary(query, key, cos, sin)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(
        attention.config._attn_implementation, eager_attention_forward
    )
    output, _ = interface(
        attention, query, key, value, attention_mask,
        dropout=attention.attention_dropout if attention.training else 0.0,
        scaling=attention.scaling, **kwargs,
    )  # fmt: skip
    return attention.o_proj(output.reshape(*input_shape, -1).contiguous())


def install_elementwise(model: torch.nn.Module, kernels: Elementwise) -> int:
    """Give every Llama decoder layer of `model` the fused training forward; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]
    for layer in layers:
        layer._elementwise = kernels
        layer.forward = types.MethodType(fused_layer_forward, layer)
    return len(layers)


def remove_elementwise(model: torch.nn.Module) -> None:
    """Back to transformers' own layer forward (benchmarks compare the two)."""
    for layer in model.modules():
        if isinstance(layer, LlamaDecoderLayer):
            vars(layer).pop("forward", None)
            vars(layer).pop("_elementwise", None)


def _reason(error: BaseException) -> str:
    """The first line of the innermost cause (torch.compile wraps what its backend raised)."""
    while (inner := getattr(error, "inner_exception", None) or error.__cause__) is not None:
        error = inner
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def choose_elementwise(model: torch.nn.Module, device: torch.device, pass_tokens: int) -> str:
    """The training's decoder-layer forward as TRAIN_COMPILE and the device allow; the log
    says which runs and why. `pass_tokens`: the length of the training's passes (the probe
    runs one of min(it, PROBE_TOKENS)). Returns "compiled" or "eager"."""
    setting = compile_setting()
    if setting == "0":
        log(f"Elementwise: transformers' eager decoder layers ({ENABLE_VARIABLE}=0)")
        return "eager"
    if setting == "auto" and device.type != "cuda":
        log(f"Elementwise: eager on {device.type} ({ENABLE_VARIABLE}=1 compiles there too)")
        return "eager"
    config = model.config
    activation = getattr(config, "hidden_act", "silu")
    if activation != "silu":  # swiglu is SiLU's: another activation runs transformers' layer
        log(f"Elementwise: eager, the base's activation is {activation!r}, not silu")
        return "eager"
    if not any(isinstance(m, LlamaDecoderLayer) for m in model.modules()):
        log(f"Elementwise: eager, no Llama decoder layers in {type(config).__name__}'s model")
        return "eager"
    layers = install_elementwise(model, compiled_elementwise())
    tokens = max(1, min(pass_tokens, PROBE_TOKENS))
    try:
        probe(model, device, tokens)
    except torch.cuda.OutOfMemoryError:  # not the compiler's fault: said as what it is
        remove_elementwise(model)
        torch.cuda.empty_cache()
        log(
            f"Elementwise: eager, the GPU ran out of memory in the compiled layers' probe pass "
            f"of {tokens:,} tokens (the training's memory plan decides what follows)"
        )
        return "eager"
    except Exception as error:  # a compiler the device lacks, a GPU triton cannot target
        remove_elementwise(model)
        log(f"Elementwise: eager, torch.compile failed on {device.type}: {_reason(error)}")
        return "eager"
    log(
        f"Elementwise: RMSNorm, rotary embedding, SwiGLU and residual adds compiled "
        f"(torch.compile) on {layers} decoder layers ({ENABLE_VARIABLE}=0 for eager)"
    )
    return "compiled"
