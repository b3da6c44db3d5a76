"""The GPU memory plan: its model of activation memory, measured on layers of the 7B shape,
and its decisions for an A40 and an H100 at the defaults and the extremes of the inputs."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from src import attention
from src.errors import UserInputError
from src.modeling import add_lora
from src.prompt_format import TokenizedExample
from src.training.batching import build_rows, collate
from src.training.examples import Examples
from src.training.fused_lora import ENABLE_VARIABLE, install_fused_lora
from src.training.loop import supervised_loss_sum
from src.training.memory import (
    BUDGET_VARIABLE,
    GIB,
    MemoryModel,
    ModelShape,
    memory_budget,
    plan_forwards,
)
from src.training.sharding import recompute_buffers
from tools.tiny_model import quantize_decoder_to_nf4

LLAMA_2_7B = {
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
}  # fmt: skip
A40, H100 = 44 * GIB, 79 * GIB  # what a 48 GB A40 and an 80 GB H100 leave free
DROPOUT = 0.05


def memory_model(
    quantized: bool = False, rank: int = 8, config: dict = LLAMA_2_7B, fused: bool = True
):
    return MemoryModel(ModelShape.of(config), quantized, rank, fused)


def test_the_7b_shape():
    shape = ModelShape.of(LLAMA_2_7B)
    assert shape.parameters == 6_738_415_616  # Llama-2-7B's published count
    model = memory_model()
    assert model.weights / GIB == pytest.approx(12.55, abs=0.01)  # bf16
    assert model.lora_parameters == 19_988_480  # rank 8 on the 7 projections (DESIGN)
    assert memory_model(quantized=True).weights / GIB == pytest.approx(3.6, abs=0.2)


def test_the_trainable_state_is_what_a_real_adapter_and_adamw_hold():
    """LoRA weights, their gradients and AdamW's state after a real step, counted in bytes,
    on a small decoder with grouped-query attention (the plan's count comes from the config
    alone)."""
    config = {
        "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
    }  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**config, max_position_embeddings=64))
    model = add_lora(base, rank=4, alpha=8, dropout=0.0, quantized=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    model(input_ids=torch.arange(16).unsqueeze(0)).logits.float().square().mean().backward()
    optimizer.step()
    held = sum(p.numel() * p.element_size() + p.grad.numel() * p.grad.element_size()
               for p in trainable)  # fmt: skip
    held += sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if t.dim() > 0
    )  # fmt: skip  (the step counts aside)
    planned = MemoryModel(ModelShape.of(config), quantized=False, lora_rank=4)
    assert held == planned.trainable_state


# ---------------------------------------------------------------- the measured activations


MEASURED_VOCAB = 1024  # a small vocabulary builds faster; the loss's share scales with it


def decoder(hidden: int, mlp: int, layers: int, quantized: bool, fused: bool = True):
    """A Llama decoder of the given shape in bf16 with LoRA on all linear layers, training
    through the fused LoRA forward (the default) or peft's."""
    config = LlamaConfig(
        vocab_size=MEASURED_VOCAB, hidden_size=hidden, intermediate_size=mlp,
        num_hidden_layers=layers, num_attention_heads=hidden // 128, max_position_embeddings=4096,
    )  # fmt: skip
    config._attn_implementation = attention.NAME
    torch.manual_seed(0)
    # Built on the meta device and filled once: what a pass keeps depends on the shapes, and
    # transformers' initialisation of 7B-shaped layers would take twice as long.
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.uniform_(-0.05, 0.05)
        recompute_buffers(model, torch.device("cpu"))
    if quantized:
        quantize_decoder_to_nf4(model, torch.bfloat16, "cpu", share_shapes=True)
    model = add_lora(model, rank=8, alpha=16, dropout=DROPOUT, quantized=quantized)
    if fused:
        install_fused_lora(model)
    return model


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
    rows, _ = build_rows(
        Examples.from_tokenized([TokenizedExample(ids, ids)]), False, False, tokens
    )
    batch = collate(rows, rows.segments(np.array([0])))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        supervised_loss_sum(model, batch, torch.device("cpu"))
    return sum(kept.values())


MEASURED_SHAPES = [  # (quantized, hidden, mlp, fused)
    (False, 4096, 11008, True), (False, 2048, 5632, True), (True, 4096, 11008, True),
    (False, 4096, 11008, False),
]  # fmt: skip


@pytest.fixture(scope="module")
def measured() -> dict:
    """Bytes per token of one decoder layer (2 layers minus 1: the first layer keeps less, its
    input needing no gradient) and of a whole 2-layer model; each at two lengths, so that
    what a layer keeps whatever the length (none of it should be) shows apart."""
    results = {}
    for shape in MEASURED_SHAPES:
        model, kept = decoder(*shape[1:3], 2, shape[0], shape[3]), {}
        for layers in (2, 1):  # then the same model without its second layer
            del model.get_base_model().model.layers[layers:]
            kept.update({(layers, tokens): saved_bytes(model, tokens) for tokens in (16, 32)})
        per_layer = {tokens: kept[2, tokens] - kept[1, tokens] for tokens in (16, 32)}
        layer = (per_layer[32] - per_layer[16]) / 16
        results[shape] = (layer, per_layer[16] - 16 * layer, (kept[2, 32] - kept[2, 16]) / 16)
    return results


@pytest.mark.parametrize(("quantized", "hidden", "mlp", "fused"), MEASURED_SHAPES)
def test_the_activation_model_covers_what_autograd_keeps(measured, quantized, hidden, mlp, fused):
    layer, kept_whatever_the_length, two_layers = measured[quantized, hidden, mlp, fused]
    # What a layer keeps whatever the length: at most its LoRA weights cast to bf16 (the fused
    # forward keeps them rather than cast them again in the backward: fewer kernels)
    assert kept_whatever_the_length <= 2 * 8 * (11 * hidden + 3 * mlp)
    config = {**LLAMA_2_7B, "hidden_size": hidden, "intermediate_size": mlp}
    config["vocab_size"] = MEASURED_VOCAB
    model = memory_model(quantized, config=config, fused=fused)
    # Never under, at most 5% over (Llama-2-7B: about 194 KB per token per layer fused, 310
    # KB through peft).
    assert layer <= model.layer_bytes_per_token <= 1.05 * layer
    # The whole model, the loss and the final norm included (a 32-layer model has 31 more
    # full layers: the estimate only gets closer).
    estimate = 2 * model.layer_bytes_per_token + model.head_bytes_per_token
    assert two_layers <= estimate <= 1.1 * two_layers


def test_the_fused_forward_keeps_less_than_peft_s():
    fused, peft = (memory_model(fused=flag).layer_bytes_per_token for flag in (True, False))
    assert fused < 0.72 * peft


# ---------------------------------------------------------------- the plan's decisions


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("longest", [2048, 4096])  # the defaults packed, and rows up to 4096
@pytest.mark.parametrize("fused", [True, False])
def test_the_defaults_fit_an_a40(quantized, longest, fused):
    plan = plan_forwards(memory_model(quantized, fused=fused), A40, longest)
    assert plan.estimated_peak <= A40
    if fused:  # an A40 holds a 4,096-token pass without checkpointing
        assert 4096 <= plan.tokens < 6144
    else:  # through peft's forward, a 2,048-token pass
        assert 2048 <= plan.tokens < 4096
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


# bench/gpu.py on an H200 (docs/benchmarks.md), Llama-2-7B: GiB the allocator had reserved at
# the peak (what runs out), by method, tokens in one pass and checkpointing. QLoRA with its
# non-quantised parts in bf16, as trained here.
H200_RESERVED = {
    ("lora", 8192, False): 92.40, ("lora", 10240, False): 111.58, ("lora", 8192, True): 19.03,
    ("lora", 4096, False): 53.05, ("qlora", 8192, False): 83.92, ("qlora", 10240, False): 103.83,
    ("qlora", 8192, True): 10.36,
}  # fmt: skip


@pytest.mark.parametrize(("method", "tokens", "checkpointing"), list(H200_RESERVED))
def test_a_plan_that_allows_a_pass_leaves_room_for_what_it_reserved(method, tokens, checkpointing):
    """The smallest budget at which the plan lets a pass hold `tokens` tokens must hold what
    the allocator reserved for it on a GPU, with half a GiB to spare. Measured through
    peft's forward, before the fused one (whose reservations bench/gpu.py measures next)."""
    model = memory_model(quantized=method == "qlora", fused=False)
    per_token = model.bytes_per_token(checkpointing)
    budget = GIB
    while model.most_tokens(budget, per_token) < tokens:
        budget += GIB // 16
    reserved = H200_RESERVED[method, tokens, checkpointing]
    assert reserved + 0.5 <= budget / GIB <= 1.35 * reserved  # room, and not much more


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
    plan = plan_forwards(memory_model(fused=False), A40, 4096)
    assert plan.describe() == (
        f"memory plan: up to {plan.tokens:,} tokens per forward pass, activation "
        f"checkpointing for segments longer than {plan.tokens:,} tokens (up to "
        f"{plan.checkpointed_tokens:,}), estimated peak {plan.estimated_peak / GIB:.1f} of "
        f"44.0 GiB"
    )


def test_the_device_plan_reads_free_memory_and_the_budget(monkeypatch):
    from src.modeling import Placement
    from src.training.memory import PROCESS_GROUP_HEADROOM, plan_for_device

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (79 * GIB, 80 * GIB))
    gpu = Placement(torch.device("cuda", 0), torch.bfloat16)
    config = {**LLAMA_2_7B, "max_position_embeddings": 4096}
    monkeypatch.delenv(BUDGET_VARIABLE, raising=False)
    assert plan_for_device(gpu, config, False, 8, 4096).budget == 79 * GIB
    monkeypatch.setenv(BUDGET_VARIABLE, "44")
    a40 = plan_for_device(gpu, config, False, 8, 4096)
    assert a40.budget == 44 * GIB and a40.tokens >= 4096 and not a40.checkpointed_tokens
    monkeypatch.setenv(ENABLE_VARIABLE, "0")  # peft's forward keeps more: 4,096 checkpointed
    assert plan_for_device(gpu, config, False, 8, 4096).checkpointed_tokens
    monkeypatch.delenv(ENABLE_VARIABLE)
    ranks = plan_for_device(gpu, config, False, 8, 4096, processes=2)
    assert ranks.budget == 44 * GIB - PROCESS_GROUP_HEADROOM


def test_a_cpu_plan_cuts_passes_for_speed_and_never_checkpoints():
    from src.modeling import Placement
    from src.training.memory import CPU_FORWARD_TOKENS, plan_for_device

    cpu = Placement(torch.device("cpu"), torch.float32)
    plan = plan_for_device(cpu, LLAMA_2_7B, False, 8, 4096)
    assert plan.tokens == CPU_FORWARD_TOKENS and not plan.checkpoint(4096)


def test_a_validation_row_never_forces_checkpointing():
    plan = plan_forwards(memory_model(), A40, longest_segment=2048, longest_validation=4096)
    assert plan.checkpointed_tokens is None


def test_passes_without_gradients_must_fit_too():
    """A validation row or a validation_prompt answer holds its tokens' KV cache."""
    with pytest.raises(UserInputError, match=r"a forward pass of 4,096 tokens without gradients"):
        plan_forwards(memory_model(), 15 * GIB, longest_segment=512, longest_validation=4096)
