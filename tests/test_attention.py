"""Segment-by-segment attention against sdpa with an explicit block-diagonal causal mask."""

import pytest
import torch
import torch.nn.functional as F

from src.attention import segment_bounds, segmented_sdpa


def block_causal_mask(positions: torch.Tensor) -> torch.Tensor:
    """(L, L) boolean mask: causal, and only inside the segment of each query."""
    segment = torch.cumsum(positions == 0, dim=0)
    causal = torch.ones(len(positions), len(positions), dtype=torch.bool).tril()
    return causal & (segment[:, None] == segment[None, :])


@pytest.mark.parametrize("kv_heads", [4, 2])  # plain and grouped-query attention
def test_matches_masked_sdpa_forward_and_backward(kv_heads):
    torch.manual_seed(0)
    positions = torch.tensor([0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3, 0])
    q = torch.randn(1, 4, 12, 8, requires_grad=True)
    k = torch.randn(1, kv_heads, 12, 8, requires_grad=True)
    v = torch.randn(1, kv_heads, 12, 8, requires_grad=True)
    ours, _ = segmented_sdpa(torch.nn.Module(), q, k, v, None, position_ids=positions[None])
    repeat = 4 // kv_heads
    expected = F.scaled_dot_product_attention(
        q,
        k.repeat_interleave(repeat, 1),
        v.repeat_interleave(repeat, 1),
        attn_mask=block_causal_mask(positions),
    ).transpose(1, 2)
    torch.testing.assert_close(ours, expected)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for ours_grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(ours_grad, expected_grad)


def test_decoding_one_position_attends_to_the_whole_cache():
    q, k, v = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4)
    ours, _ = segmented_sdpa(torch.nn.Module(), q, k, v, None, position_ids=torch.tensor([[6]]))
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v).transpose(1, 2))


def test_segment_bounds():
    assert segment_bounds(torch.tensor([0, 1, 2, 0, 0, 1])) == [(0, 3), (3, 4), (4, 6)]
    assert segment_bounds(torch.tensor([5, 6, 0, 1])) == [(0, 2), (2, 4)]
