"""Numerics of the training step: batch-split invariance and isolation of packed examples.

They run in fp32 on whatever device the training would use (the split attention path on a
CPU, and on a GPU too: the varlen kernel is bf16-only, tested in tests/test_attention.py), so
one tolerance holds everywhere: 1e-4 relative, the summation order of fp32 differing.
"""

import numpy as np
import pytest
import torch
from bitsandbytes.functional import has_avx512bf16
from torch.utils._python_dispatch import TorchDispatchMode

from src.modeling import Placement, add_lora, load_base_model, pick_placement
from src.prompt_format import encode_chat_examples, encode_text_examples
from src.training.batching import Rows, build_rows, collate, forward_groups, optimizer_steps
from src.training.examples import Examples
from src.training.loop import accumulate_gradients, supervised_loss_sum, validation_loss
from tests.helpers import FACTS

DEVICE = pick_placement().device
FP32 = Placement(DEVICE, torch.float32)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    torch.manual_seed(0)
    base = load_base_model(tiny_model_dir, quantize_4bit=False, placement=FP32)
    lora = add_lora(base, rank=8, alpha=16, dropout=0.0, quantized=False)
    for name, parameter in lora.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapter matter for the gradients
            torch.nn.init.normal_(parameter, std=0.02)
    return lora


@pytest.fixture(scope="module")
def examples(tokenizer) -> Examples:
    chat = encode_chat_examples(tokenizer, *map(list, zip(*FACTS, strict=True)), [None] * 4)
    text = encode_text_examples(tokenizer, ["Zorbia is a small country.", "Teal is a colour."])
    return Examples.from_tokenized(chat + text)


def every_row(rows: Rows):
    """All rows as one micro-batch."""
    return collate(rows, rows.segments(np.arange(len(rows))))


def lora_gradients(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_same_gradients(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal within 1e-4 relative to each tensor's norm (fp32 summation order differs)."""
    assert a.keys() == b.keys() and a
    for name in a:
        error = (a[name] - b[name]).norm() / b[name].norm()
        assert error < 1e-4, f"{name}: relative difference {error:.2e}"


def step_gradients(model, rows: Rows, micro: int) -> tuple[float, dict[str, torch.Tensor]]:
    [step] = optimizer_steps(rows, list(range(len(rows))), len(rows), micro)
    batches = [collate(rows, rows.segments(m)) for m in step.micro_batches]
    loss = accumulate_gradients(model, batches, step.num_targets, DEVICE)
    return loss, lora_gradients(model)


@pytest.fixture(scope="module")
def reference(model, tiny_model_dir):
    """The same weights in plain transformers + peft: eager attention over a padded batch."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, attn_implementation="eager", dtype=torch.float32, device_map=DEVICE
    )
    twin = add_lora(base, rank=8, alpha=16, dropout=0.0, quantized=False)
    set_peft_model_state_dict(twin, get_peft_model_state_dict(model))
    return twin


def reference_loss_and_gradients(reference, examples: Examples):
    """Hugging Face's own loss: right-padded rows, labels -100 where no loss is taken, the mean
    over the supervised tokens of the batch."""
    length = int(examples.lengths.max())
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    labels = torch.full((len(examples), length), -100)
    mask = torch.zeros(len(examples), length, dtype=torch.long)
    for i in range(len(examples)):
        example = examples.tokens(i)
        n = len(example.input_ids)
        ids[i, :n] = torch.tensor(example.input_ids)
        labels[i, :n] = torch.tensor(example.labels)
        mask[i, :n] = 1
    reference.train()
    ids, mask, labels = ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)
    loss = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.item(), lora_gradients(reference)


@pytest.mark.parametrize(("micro", "forward_tokens"), [(6, None), (4, None), (1, None), (4, 40)])
def test_a_step_matches_a_plain_hugging_face_step(
    model, reference, examples, micro, forward_tokens
):
    """Any micro-batch split, and the CPU's forward groups, give the reference loss and update."""
    expected_loss, expected_grads = reference_loss_and_gradients(reference, examples)
    rows, _ = build_rows(examples, pack=False, wrap=False, chunk_size=64)
    [step] = optimizer_steps(rows, list(range(len(rows))), len(rows), micro)
    batches = [
        collate(rows, group)
        for m in step.micro_batches
        for group in forward_groups(rows, m, forward_tokens)
    ]
    if forward_tokens:
        assert len(batches) > len(step.micro_batches)  # the groups split micro-batches
    model.train()
    loss = accumulate_gradients(model, batches, step.num_targets, DEVICE)
    assert float(loss) == pytest.approx(expected_loss, rel=1e-5)
    assert_same_gradients(lora_gradients(model), expected_grads)


class HostReads(TorchDispatchMode):
    """Counts what makes a host wait for a GPU: reading a value (`.item()`, `float()`) and
    indexing by a boolean mask (its size is known only once the device has computed it)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        masks = [a for a in args[1] or []] if name == "aten.index.Tensor" else []
        if name in ("aten._local_scalar_dense.default", "aten.nonzero.default") or any(
            isinstance(m, torch.Tensor) and m.dtype == torch.bool for m in masks
        ):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def test_the_passes_of_a_step_never_wait_for_the_device(model, examples):
    """Three passes forward and backward read nothing back: the loss stays on the device
    until the step ends, and the supervised positions come as host-built indices."""
    rows, _ = build_rows(examples, pack=True, wrap=False, chunk_size=64)
    [step] = optimizer_steps(rows, list(range(len(rows))), len(rows), 1)
    batches = [collate(rows, rows.segments(m)) for m in step.micro_batches]
    assert len(batches) >= 2
    model.train()
    with HostReads() as mode:
        loss = accumulate_gradients(model, batches, step.num_targets, DEVICE)
    model.zero_grad(set_to_none=True)
    assert mode.reads == [] and loss.device == DEVICE and loss.requires_grad is False


def test_validation_loss_is_the_token_weighted_mean(model, reference, examples):
    rows, _ = build_rows(examples, pack=False, wrap=False, chunk_size=64)
    expected, _ = reference_loss_and_gradients(reference, examples)
    for batch_size in (1, 4):
        assert validation_loss(model, rows, batch_size, DEVICE) == pytest.approx(expected, rel=1e-5)


def loss_and_gradients(model, rows: Rows, alone: bool = False):
    """Loss sum and LoRA gradients of `rows`, each row computed on its own (or, `alone`,
    each segment on its own)."""
    model.eval()
    groups = [rows.segments(np.array([row])) for row in range(len(rows))]
    if alone:
        groups = [group[i : i + 1] for group in groups for i in range(len(group))]
    loss = sum(supervised_loss_sum(model, collate(rows, group), DEVICE) for group in groups)
    loss.backward()
    return loss.item(), lora_gradients(model)


@pytest.mark.parametrize(("wrap", "chunk_size", "num_rows"), [(False, 256, 1), (True, 40, 4)])
def test_packed_examples_do_not_see_each_other(model, examples, wrap, chunk_size, num_rows):
    """A packed (or wrapped) row costs exactly what its examples (or fragments) cost alone."""
    packed_rows, stats = build_rows(examples, pack=True, wrap=wrap, chunk_size=chunk_size)
    assert stats.rows == num_rows
    packed_loss, packed_grads = loss_and_gradients(model, packed_rows)
    alone_loss, alone_grads = loss_and_gradients(model, packed_rows, alone=True)
    assert packed_loss == pytest.approx(alone_loss, rel=1e-4)
    assert_same_gradients(packed_grads, alone_grads)


def qlora_model(model_dir):
    torch.manual_seed(0)
    base = load_base_model(model_dir, quantize_4bit=True, placement=FP32)
    model = add_lora(base, rank=8, alpha=16, dropout=0.0, quantized=True)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    return model


def linear_4bit_layers(model) -> list:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


@pytest.mark.filterwarnings("ignore:bitsandbytes.*an autograd kernel was not registered")
@pytest.mark.skipif(
    not has_avx512bf16(),
    reason="bitsandbytes repacks 4-bit weights for inference only on CPUs with AVX512-BF16",
)
def test_validation_leaves_the_qlora_gradients_unchanged(tiny_model_dir, examples):
    model = qlora_model(tiny_model_dir)
    rows, _ = build_rows(examples, pack=False, wrap=False, chunk_size=64)

    def gradients() -> dict[str, torch.Tensor]:
        model.train()
        return step_gradients(model, rows, micro=len(rows))[1]

    before = gradients()
    validation_loss(model, rows, batch_size=2, device=DEVICE)
    assert_same_gradients(gradients(), before)
    # The check can fail: with bitsandbytes' default, the same validation pass repacks the
    # 4-bit weights and training then runs through the inference kernel.
    for layer in linear_4bit_layers(model):
        layer.support_avx512bf16_for_cpu = True
    validation_loss(model, rows, batch_size=2, device=DEVICE)
    layers = linear_4bit_layers(model)
    assert any(layer.weight.quant_state.packing_format_for_cpu for layer in layers)
    with pytest.raises(AssertionError):
        assert_same_gradients(gradients(), before)


def test_qlora_trains_on_dimensions_that_are_not_multiples_of_32(tmp_path, examples):
    """With the repack off, bitsandbytes' CPU path takes any shape (its kernel asserted 32s)."""
    from tools.tiny_model import build_tiny_llama

    model_dir = build_tiny_llama(tmp_path / "odd", size="micro", intermediate_size=172)
    model = qlora_model(model_dir)
    rows, _ = build_rows(examples, pack=False, wrap=False, chunk_size=64)
    model.train()
    before = step_gradients(model, rows, micro=2)[1]
    assert validation_loss(model, rows, batch_size=2, device=DEVICE) > 0
    model.train()
    assert_same_gradients(step_gradients(model, rows, micro=2)[1], before)


def test_passes_longer_than_the_plan_are_checkpointed_and_give_the_same_step(
    model, reference, examples, monkeypatch
):
    """The memory plan checkpoints only the passes above its limit: the step stays exact."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from src.training.memory import ForwardPlan

    layer = next(m for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
    checkpointed, checkpoint = [], layer._gradient_checkpointing_func

    def counting(*args, **kwargs):
        checkpointed.append(True)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(layer, "_gradient_checkpointing_func", counting)
    plan = ForwardPlan(tokens=20, checkpointed_tokens=4096)
    expected_loss, expected_grads = reference_loss_and_gradients(reference, examples)
    rows, _ = build_rows(examples, pack=False, wrap=False, chunk_size=64)
    batches = [
        collate(rows, group) for group in forward_groups(rows, np.arange(len(rows)), plan.tokens)
    ]
    long_passes = sum(batch.num_real_tokens > 20 for batch in batches)
    assert 0 < long_passes < len(batches)  # some passes over the limit, some under
    model.train()
    loss = accumulate_gradients(model, batches, sum(b.num_targets for b in batches), DEVICE, plan)
    assert len(checkpointed) == long_passes  # this layer ran checkpointed in those passes only
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert_same_gradients(lora_gradients(model), expected_grads)


def test_qlora_keeps_its_non_quantised_parts_in_bf16_within_1_percent(tiny_model_dir, examples):
    """In bf16, peft's prepare_model_for_kbit_training would run embeddings, norms and head
    (and so the residual stream) in fp32: 45% more activation memory and a third of the speed
    on an H200 (docs/benchmarks.md). Left in bf16, the loss moves by less than 1% (0.06% on
    this model)."""
    from peft import prepare_model_for_kbit_training

    bf16 = Placement(DEVICE, torch.bfloat16)
    rows, _ = build_rows(examples, pack=False, wrap=False, chunk_size=64)
    batch = every_row(rows)
    losses, gradients = [], []
    for upcast in (False, True):
        torch.manual_seed(0)
        base = load_base_model(tiny_model_dir, quantize_4bit=True, placement=bf16)
        if upcast:
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        model = add_lora(base, rank=8, alpha=16, dropout=0.0, quantized=True)
        kept = {p.dtype for n, p in model.named_parameters() if "norm" in n}
        assert kept == ({torch.float32} if upcast else {torch.bfloat16})
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # a trained-looking adapter, the same in both
                torch.nn.init.normal_(parameter, std=0.02)
        model.train()
        loss = supervised_loss_sum(model, batch, DEVICE) / batch.num_targets
        loss.backward()
        losses.append(loss.item())
        gradients.append(lora_gradients(model))
    ours, upcast = losses
    assert ours == pytest.approx(upcast, rel=0.01)
    for name, gradient in gradients[1].items():  # and the update points the same way
        cosine = torch.nn.functional.cosine_similarity(
            gradients[0][name].flatten().float(), gradient.flatten().float(), dim=0
        )
        assert cosine > 0.99, name


def test_passes_of_zero_weight_add_exact_zeros_and_draw_no_dropout(tiny_model_dir, examples):
    """Lockstep fillers (a rank short of passes under FSDP2): the gradients and the random
    state after the step are those of the step without them, bit for bit."""
    from src.training.loop import filler_batch

    base = load_base_model(tiny_model_dir, False, FP32)
    model = add_lora(base, rank=8, alpha=16, dropout=0.1, quantized=False)
    model.train()
    rows, _ = build_rows(examples, pack=False, wrap=False, chunk_size=0)
    batches = [collate(rows, rows.segments(np.array([i]))) for i in range(2)]
    targets = sum(b.num_targets for b in batches)
    outcomes = []
    for fillers in ([], [filler_batch(rows)] * 2):
        torch.manual_seed(0)
        loss = accumulate_gradients(model, batches, targets, DEVICE, fillers=fillers)
        outcomes.append((loss, lora_gradients(model), torch.random.get_rng_state()))
    (loss, grads, rng), (filled_loss, filled_grads, filled_rng) = outcomes
    assert torch.equal(loss, filled_loss) and torch.equal(rng, filled_rng)
    assert grads.keys() == filled_grads.keys() and grads
    assert all(torch.equal(grads[name], filled_grads[name]) for name in grads)
    filler = filler_batch(rows)
    assert filler.num_targets > 0
    assert filler.num_real_tokens == rows.lengths[rows.num_targets > 0].min()  # the cheapest
