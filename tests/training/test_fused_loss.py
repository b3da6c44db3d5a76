"""The fused vocabulary projection and cross-entropy: the loss and the gradient of the
hidden states equal F.cross_entropy's through autograd (fp64 gradcheck; fp32 to rounding;
bf16 within one rounding of the kept gradient), and it keeps 2 bytes a hidden value per
position where autograd kept 4 bytes a vocabulary entry."""

import pytest
import torch
import torch.nn.functional as F

from src.training.fused_loss import LinearCrossEntropy, cross_entropy_sum


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
