"""The GPU memory plan: its model of activation memory, measured on layers of the 7B shape,
and its decisions for an A40 and an H100 at the defaults and the extremes of the inputs."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from src import attention
from src.errors import UserInputError
from src.modeling import add_lora
from src.training.batching import Row, Segment, collate
from src.training.loop import supervised_loss_sum
from src.training.memory import (
    BUDGET_VARIABLE,
    GIB,
    MemoryModel,
    ModelShape,
    memory_budget,
    plan_forwards,
)

LLAMA_2_7B = {
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
}  # fmt: skip
A40, H100 = 44 * GIB, 79 * GIB  # what a 48 GB A40 and an 80 GB H100 leave free
DROPOUT = 0.05


def memory_model(quantized: bool = False, rank: int = 8, config: dict = LLAMA_2_7B):
    return MemoryModel(ModelShape.of(config), quantized, rank)


def test_the_7b_shape():
    shape = ModelShape.of(LLAMA_2_7B)
    assert shape.parameters == 6_738_415_616  # Llama-2-7B's published count
    model = memory_model()
    assert model.weights / GIB == pytest.approx(12.55, abs=0.01)  # bf16
    assert model.lora_parameters == 19_988_480
    assert model.trainable_state == 16 * 19_988_480
    assert memory_model(quantized=True).weights / GIB == pytest.approx(3.6, abs=0.2)


# ---------------------------------------------------------------- the measured activations


MEASURED_VOCAB = 1024  # a small vocabulary builds faster; the loss's share scales with it


def decoder(hidden: int, mlp: int, layers: int, quantized: bool):
    """A Llama decoder of the given shape in bf16 with LoRA on all linear layers."""
    config = LlamaConfig(
        vocab_size=MEASURED_VOCAB, hidden_size=hidden, intermediate_size=mlp,
        num_hidden_layers=layers, num_attention_heads=hidden // 128, max_position_embeddings=4096,
    )  # fmt: skip
    config._attn_implementation = attention.NAME
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    if quantized:
        quantize_decoder(model)
    return add_lora(model, rank=8, alpha=16, dropout=DROPOUT, quantized=quantized)


def quantize_decoder(model) -> None:
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                quantized = bnb.nn.Linear4bit(
                    linear.in_features, linear.out_features, bias=False,
                    compute_dtype=torch.bfloat16, quant_type="nf4", device="meta",
                )  # fmt: skip
                quantized.weight = bnb.nn.Params4bit(
                    linear.weight.data, requires_grad=False, quant_type="nf4",
                    compress_statistics=True,
                ).to("cpu")  # fmt: skip
                setattr(parent, name, quantized)


def saved_bytes(model, tokens: int) -> int:
    """What autograd keeps for the backward pass of this project's loss (each storage once,
    parameters left out), with dropout masks counted as CUDA keeps them: 1 byte a value (a
    CPU keeps them as floats of 0 and 1 / (1 - p))."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}
    mask_values = torch.tensor([0.0, 1 / (1 - DROPOUT)])

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in parameters:
            return tensor
        is_mask = (
            tensor.is_floating_point()
            and torch.isin(tensor.float(), mask_values.to(tensor.dtype).float()).all()
        )
        kept[storage.data_ptr()] = tensor.numel() if is_mask else storage.nbytes()
        return tensor

    ids = [5 + i % (MEASURED_VOCAB - 5) for i in range(tokens)]
    batch = collate([Row((Segment(ids, ids),))])
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        supervised_loss_sum(model, batch, torch.device("cpu"))
    return sum(kept.values())


@pytest.fixture(scope="module")
def measured() -> dict:
    """Bytes per token of one decoder layer (2 layers minus 1) and of the rest of the model."""
    tokens, results = 64, {}
    for quantized, hidden, mlp in ((False, 4096, 11008), (False, 2048, 5632), (True, 4096, 11008)):
        one, two = (saved_bytes(decoder(hidden, mlp, n, quantized), tokens) for n in (1, 2))
        results[quantized, hidden, mlp] = ((two - one) / tokens, (2 * one - two) / tokens)
    return results


@pytest.mark.parametrize(
    ("quantized", "hidden", "mlp"), [(False, 4096, 11008), (False, 2048, 5632), (True, 4096, 11008)]
)
def test_the_activation_model_covers_what_autograd_keeps(measured, quantized, hidden, mlp):
    layer, rest = measured[quantized, hidden, mlp]
    config = {**LLAMA_2_7B, "hidden_size": hidden, "intermediate_size": mlp}
    config["vocab_size"] = MEASURED_VOCAB
    model = memory_model(quantized, config=config)
    # Never under, at most 5% over (Llama-2-7B: about 310 KB per token per layer).
    assert layer <= model.layer_bytes_per_token <= 1.05 * layer
    assert rest <= model.head_bytes_per_token <= 1.1 * rest  # fp32 logits, final norm


# ---------------------------------------------------------------- the plan's decisions


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("longest", [2048, 4096])  # the defaults packed, and rows up to 4096
def test_the_defaults_fit_an_a40(quantized, longest):
    plan = plan_forwards(memory_model(quantized), A40, longest)
    assert plan.estimated_peak <= A40
    assert 2048 <= plan.tokens < 4096  # an A40 holds a 2,048-token pass without checkpointing
    if longest > plan.tokens:  # a longer row runs alone, checkpointed
        assert plan.checkpointed_tokens >= longest
    else:
        assert plan.checkpointed_tokens is None
    assert plan.validation_tokens >= 16_384


@pytest.mark.parametrize("quantized", [False, True])
def test_an_h100_needs_no_checkpointing_at_the_defaults(quantized):
    plan = plan_forwards(memory_model(quantized), H100, 4096)
    assert plan.checkpointed_tokens is None and plan.tokens >= 4096
    assert plan.estimated_peak <= H100


def test_the_estimates_bound_what_an_h200_measured():
    """bench/gpu.py on an H200 (docs/benchmarks.md): peak GiB allocated for LoRA bf16."""
    model = memory_model()
    measured = {(8192, False): 89.68, (8192, True): 18.15, (4096, False): 51.50}
    for (tokens, checkpointing), gib in measured.items():
        estimate = model.peak(tokens, checkpointing) / GIB
        assert gib <= estimate <= 1.15 * gib


def test_the_largest_rank_the_archive_allows_still_plans_on_an_a40():
    plan = plan_forwards(memory_model(rank=429), A40, 4096)
    assert plan.estimated_peak <= A40 and plan.checkpointed_tokens >= 4096


def test_what_cannot_fit_is_refused_naming_the_input():
    with pytest.raises(UserInputError) as error:
        plan_forwards(memory_model(rank=429), 22 * GIB, 4096)
    message = str(error.value)
    assert "lower lora_rank" in message and "22.0 GiB available" in message
    assert "state (16.0 GiB) need 28.5 GiB before any activation" in message
    with pytest.raises(UserInputError, match=r"a training row of 4,096 tokens needs about .* GiB"):
        plan_forwards(memory_model(), 15 * GIB, 4096)
    with pytest.raises(UserInputError, match="lower chunk_size or shorten the longest rows"):
        plan_forwards(memory_model(), 15 * GIB, 4096)


def test_the_operator_can_hold_a_card_to_a_smaller_budget(monkeypatch):
    assert memory_budget(79 * GIB) == 79 * GIB
    monkeypatch.setenv(BUDGET_VARIABLE, "44")
    assert memory_budget(79 * GIB) == 44 * GIB
    assert memory_budget(30 * GIB) == 30 * GIB  # never more than is free
    monkeypatch.setenv(BUDGET_VARIABLE, "lots")
    with pytest.raises(UserInputError, match=f"{BUDGET_VARIABLE} must be a number of GiB"):
        memory_budget(79 * GIB)


def test_the_plan_is_logged_in_words():
    plan = plan_forwards(memory_model(), A40, 4096)
    assert plan.describe() == (
        f"memory plan: up to {plan.tokens:,} tokens per forward pass, activation "
        f"checkpointing for segments longer than {plan.tokens:,} tokens (up to "
        f"{plan.checkpointed_tokens:,}), estimated peak {plan.estimated_peak / GIB:.1f} of "
        f"44.0 GiB"
    )
