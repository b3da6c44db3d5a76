"""Numerics of the training step: batch-split invariance and isolation of packed examples."""

import pytest
import torch

from src.batching import Row, build_rows, collate, optimizer_steps
from src.data import Example
from src.modeling import add_lora, load_base_model, pick_placement
from src.prompt_format import encode_chat_examples, encode_text_examples
from src.trainer import accumulate_gradients, supervised_loss_sum
from tests.helpers import FACTS

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    torch.manual_seed(0)
    base = load_base_model(tiny_model_dir, quantize_4bit=False, placement=pick_placement())
    lora = add_lora(base, rank=8, alpha=16, dropout=0.0, quantized=False)
    for name, parameter in lora.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapter matter for the gradients
            torch.nn.init.normal_(parameter, std=0.02)
    return lora


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[Example]:
    chat = encode_chat_examples(tokenizer, *map(list, zip(*FACTS, strict=True)), [None] * 4)
    text = encode_text_examples(tokenizer, ["Zorbia is a small country.", "Teal is a colour."])
    return [Example(f"line {i}", e) for i, e in enumerate(chat + text)]


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


def step_gradients(model, rows: list[Row], micro: int) -> tuple[float, dict[str, torch.Tensor]]:
    [step] = optimizer_steps(rows, list(range(len(rows))), len(rows), micro)
    loss = accumulate_gradients(
        model, [collate(m) for m in step.micro_batches], step.num_targets, CPU
    )
    return loss, lora_gradients(model)


def test_the_update_does_not_depend_on_the_micro_batch_split(model, examples):
    rows, _ = build_rows(examples, pack=False, wrap=False, chunk_size=64)
    loss_whole, grads_whole = step_gradients(model, rows, micro=len(rows))
    for micro in (1, 4):
        loss, grads = step_gradients(model, rows, micro)
        assert loss == pytest.approx(loss_whole, rel=1e-5)
        assert_same_gradients(grads, grads_whole)


def loss_and_gradients(model, rows: list[Row]) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss sum and LoRA gradients of `rows`, each row computed on its own."""
    model.eval()
    loss = sum(supervised_loss_sum(model, collate([row]), CPU) for row in rows)
    loss.backward()
    return loss.item(), lora_gradients(model)


@pytest.mark.parametrize(("wrap", "chunk_size", "num_rows"), [(False, 256, 1), (True, 40, 4)])
def test_packed_examples_do_not_see_each_other(model, examples, wrap, chunk_size, num_rows):
    """A packed (or wrapped) row costs exactly what its examples (or fragments) cost alone."""
    packed_rows, stats = build_rows(examples, pack=True, wrap=wrap, chunk_size=chunk_size)
    assert stats.rows == num_rows
    packed_loss, packed_grads = loss_and_gradients(model, packed_rows)
    one_by_one = [Row((segment,)) for row in packed_rows for segment in row.segments]
    alone_loss, alone_grads = loss_and_gradients(model, one_by_one)
    assert packed_loss == pytest.approx(alone_loss, rel=1e-4)
    assert_same_gradients(packed_grads, alone_grads)
