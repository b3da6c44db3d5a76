"""The fused vocabulary projection and cross-entropy: the loss and the gradient of the
hidden states equal F.cross_entropy's through autograd (fp64 gradcheck; fp32 to rounding;
bf16 within one rounding of the kept gradient), and it keeps 2 bytes a hidden value per
position where autograd kept 4 bytes a vocabulary entry."""

import pytest
import torch
import torch.nn.functional as F

from src.training.fused_loss import (
    LinearCrossEntropy,
    chunked_cross_entropy_sum,
    cross_entropy_sum,
    training_loss_sum,
)


def problem(dtype: torch.dtype, positions: int = 11, hidden: int = 16, vocab: int = 37):
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(positions, hidden, generator=generator).to(dtype).requires_grad_()
    head = torch.nn.Linear(hidden, vocab, bias=False).to(dtype).requires_grad_(False)
    targets = torch.randint(0, vocab, (positions,), generator=generator)
    return states, head, targets


def autograd_loss(states, head, targets, scale: float = 1.0):
    return F.cross_entropy(head(states).float(), targets, reduction="sum") * scale


def test_fp64_gradcheck_over_several_chunks():
    states, head, targets = problem(torch.float64)
    assert torch.autograd.gradcheck(
        lambda s: LinearCrossEntropy.apply(s, head.weight, targets, 4), (states,)
    )


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_fp32_loss_and_gradient_equal_autograd_s(chunk):
    states, head, targets = problem(torch.float32)
    (cross_entropy_sum(states, head, targets, chunk) / 7).backward()
    ours, states.grad = states.grad, None
    reference = autograd_loss(states, head, targets, 1 / 7)
    reference.backward()
    torch.testing.assert_close(cross_entropy_sum(states, head, targets, chunk) / 7, reference)
    torch.testing.assert_close(ours, states.grad, rtol=1e-5, atol=1e-7)


def test_bf16_within_one_rounding_of_autograd_s():
    states, head, targets = problem(torch.bfloat16, positions=64, hidden=64, vocab=500)
    loss = cross_entropy_sum(states, head, targets, 16)
    (loss / 64).backward()
    ours, states.grad = states.grad.float(), None
    reference = autograd_loss(states, head, targets)
    (reference / 64).backward()
    torch.testing.assert_close(loss, reference)  # the same logits, reduced in fp32
    error = (ours - states.grad.float()).abs().max()
    assert error <= 2**-7 * states.grad.float().abs().max()  # one bf16 ulp of the largest


def test_without_gradients_nothing_is_kept_and_the_loss_is_the_same():
    states, head, targets = problem(torch.float32)
    with torch.no_grad():
        loss = cross_entropy_sum(states, head, targets)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, autograd_loss(states, head, targets).detach())


def kept_bytes(function, states, head, targets) -> int:
    kept = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() != head.weight.untyped_storage().data_ptr():
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function(states, head, targets)
    return sum(kept.values())


def test_it_keeps_the_hidden_states_gradient_only():
    states, head, targets = problem(torch.bfloat16, positions=64, hidden=64, vocab=2000)
    assert kept_bytes(cross_entropy_sum, states, head, targets) == 64 * 64 * 2
    assert kept_bytes(autograd_loss, states, head, targets) >= 64 * 2000 * 4


def test_a_trained_or_biased_head_is_refused():
    states, head, targets = problem(torch.float32)
    with pytest.raises(ValueError, match="frozen"):
        cross_entropy_sum(states, head.requires_grad_(True), targets)
    with pytest.raises(TypeError, match="plain linear head"):
        cross_entropy_sum(states, torch.nn.Linear(16, 37), targets)


def test_the_variable_brings_autograd_s_loss_back(monkeypatch):
    """TRAIN_FUSED_LOSS=0: the same sum and gradient through autograd, chunk by chunk,
    keeping its fp32 log-softmax (what the memory plan then counts); an unknown value is
    refused."""
    from src.training.memory import MemoryModel, ModelShape, memory_model_for

    states, head, targets = problem(torch.float32, positions=40, vocab=300)
    (training_loss_sum(states, head, targets) / 3).backward()
    fused, states.grad = states.grad, None
    monkeypatch.setenv("TRAIN_FUSED_LOSS", "0")
    loss = training_loss_sum(states, head, targets)
    (loss / 3).backward()
    torch.testing.assert_close(loss, cross_entropy_sum(states, head, targets))
    torch.testing.assert_close(states.grad, fused, rtol=1e-5, atol=1e-7)
    assert kept_bytes(training_loss_sum, states, head, targets) >= 40 * 300 * 4
    torch.testing.assert_close(
        chunked_cross_entropy_sum(states, head, targets, chunk=7), loss.detach()
    )
    shape = ModelShape(hidden=4096, mlp=11008, layers=32, vocab=32000, parameters=6_738_415_616,
                       lora_parameters_per_rank=2_498_560, context_window=4096)  # fmt: skip
    fused_plan, autograd_plan = (MemoryModel(shape, False, 8, fused_loss=f) for f in (True, False))
    extra = autograd_plan.head_bytes_per_token - fused_plan.head_bytes_per_token
    assert extra == 4 * 32000  # 128 KB a token
    config = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "vocab_size": 32000, "num_attention_heads": 32}  # fmt: skip
    assert not memory_model_for(config, False, 8).fused_loss  # the training plans with it
    monkeypatch.delenv("TRAIN_FUSED_LOSS")
    assert memory_model_for(config, False, 8).fused_loss
    monkeypatch.setenv("TRAIN_FUSED_LOSS", "maybe")
    with pytest.raises(ValueError, match="TRAIN_FUSED_LOSS must be 0 or 1"):
        training_loss_sum(states, head, targets)
