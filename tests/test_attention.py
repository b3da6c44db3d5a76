"""Packed attention on every path that can run here, against sdpa with a block-diagonal mask.

The split path runs everywhere; the varlen flash kernel runs where CUDA (compute capability
8.0+) is present, in bf16, with tolerances for that precision.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from src.attention import (
    PackedSegments,
    VarlenCall,
    packed_sdpa,
    segment_lengths,
    varlen_causal_kwargs,
    varlen_supported,
)

CUDA = torch.cuda.is_available()


def block_causal_mask(positions: torch.Tensor) -> torch.Tensor:
    """(L, L) boolean mask: causal, and only inside the segment of each query."""
    segment = torch.cumsum(positions == 0, dim=0)
    causal = torch.ones(len(positions), len(positions), dtype=torch.bool, device=positions.device)
    return causal.tril() & (segment[:, None] == segment[None, :])


def positions_of(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])


PATHS = [
    pytest.param("cpu", torch.float32, id="split-cpu-fp32"),
    pytest.param(
        "cuda",
        torch.float32,
        id="split-cuda-fp32",
        marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"),
    ),
    pytest.param(
        "cuda",
        torch.bfloat16,
        id="varlen-cuda-bf16",
        marks=pytest.mark.skipif(not CUDA, reason="the varlen kernel needs CUDA"),
    ),
]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@pytest.mark.parametrize(("device", "dtype"), PATHS)
@pytest.mark.parametrize("kv_heads", [4, 2])  # plain and grouped-query attention
@pytest.mark.parametrize("pass_segments", [True, False])  # from collate, or read from positions
def test_matches_masked_sdpa_forward_and_backward(device, dtype, kv_heads, pass_segments):
    torch.manual_seed(0)
    lengths = [5, 2, 4, 1, 20]
    positions = positions_of(lengths).to(device)
    length = len(positions)
    q = torch.randn(1, 4, length, 64, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(1, kv_heads, length, 64, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(1, kv_heads, length, 64, device=device, dtype=dtype, requires_grad=True)
    segments = PackedSegments.of(lengths, q.device) if pass_segments else None
    ours, _ = packed_sdpa(
        torch.nn.Module(), q, k, v, None, position_ids=positions[None], packed_segments=segments
    )
    repeat = 4 // kv_heads
    reference = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(
        reference[0],
        reference[1].repeat_interleave(repeat, 1),
        reference[2].repeat_interleave(repeat, 1),
        attn_mask=block_causal_mask(positions),
    ).transpose(1, 2)
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(ours.double(), expected, atol=tolerance, rtol=tolerance)
    grads = torch.autograd.grad(ours.float().square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.square().sum(), reference)
    for ours_grad, expected_grad in zip(grads, expected_grads, strict=True):
        scale = expected_grad.abs().max()
        assert (ours_grad.double() - expected_grad).abs().max() <= tolerance * scale


@pytest.mark.skipif(not CUDA, reason="the varlen kernel needs CUDA")
def test_the_varlen_kernel_is_used_on_cuda_in_bf16():
    query = torch.zeros(1, 1, 1, 8, device="cuda", dtype=torch.bfloat16)
    assert varlen_supported(query) == (torch.cuda.get_device_capability()[0] >= 8)


def test_split_path_where_the_kernel_cannot_run():
    assert not varlen_supported(torch.zeros(1, 1, 1, 8))  # CPU
    if CUDA:
        assert not varlen_supported(torch.zeros(1, 1, 1, 8, device="cuda"))  # fp32


def test_causal_flag_for_each_torch_signature():
    def torch_2_13(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        raise AssertionError

    def torch_2_11(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False, scale=None):
        raise AssertionError

    def unknown(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None):
        raise AssertionError

    assert varlen_causal_kwargs(torch_2_13) == {"window_size": (-1, 0)}
    assert varlen_causal_kwargs(torch_2_11) == {"is_causal": True}
    assert varlen_causal_kwargs(unknown) is None


def test_decoding_one_position_attends_to_the_whole_cache():
    q, k, v = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4)
    ours, _ = packed_sdpa(torch.nn.Module(), q, k, v, None, position_ids=torch.tensor([[6]]))
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v).transpose(1, 2))


def test_segment_lengths_and_cumulative_bounds():
    assert segment_lengths(torch.tensor([0, 1, 2, 0, 0, 1])) == [3, 1, 2]
    assert segment_lengths(torch.tensor([5, 6, 0, 1])) == [2, 2]
    segments = PackedSegments.of([3, 1, 2], torch.device("cpu"))
    assert segments.cu_seqlens.tolist() == [0, 3, 4, 6]
    assert segments.cu_seqlens.dtype == torch.int32
    assert segments.max_length == 3


def reference_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None):
    """varlen_attn's contract computed on a CPU: each segment of the (L, H, D) inputs attends
    causally to itself, as the bounds say; the longest segment is checked, not trusted."""
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and cu_q[0] == 0
    assert cu_q[-1] == q.shape[0] == k.shape[0] and q.shape[1] == k.shape[1] == v.shape[1]
    assert max_q == max_k == int(cu_q.diff().max())
    bounds = cu_q.tolist()
    pieces = [
        F.scaled_dot_product_attention(
            *(t[start:end].transpose(0, 1) for t in (q, k, v)), is_causal=True, scale=scale
        ).transpose(0, 1)
        for start, end in itertools.pairwise(bounds)
    ]
    return torch.cat(pieces)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("pass_segments", [True, False])
def test_the_varlen_branch_builds_the_kernel_call_the_mask_describes(
    monkeypatch, kv_heads, pass_segments
):
    """The GPU branch of packed_sdpa, run on a CPU up to the kernel: its bounds, its head
    layout and its scale, given to a reference of the kernel's contract, equal masked sdpa."""
    import src.attention as attention

    monkeypatch.setattr(attention, "varlen_supported", lambda query: True)
    monkeypatch.setattr(attention, "causal_varlen_kernel", lambda: reference_varlen_kernel)
    torch.manual_seed(1)
    lengths = [5, 2, 4, 1, 20]
    positions = positions_of(lengths)
    length = len(positions)
    q = torch.randn(1, 4, length, 16, dtype=torch.float64)
    k, v = torch.randn(2, 1, kv_heads, length, 16, dtype=torch.float64)
    segments = PackedSegments.of(lengths, q.device) if pass_segments else None
    ours, _ = packed_sdpa(
        torch.nn.Module(),
        q,
        k,
        v,
        None,
        scaling=0.3,
        position_ids=positions[None],
        packed_segments=segments,
    )
    repeat = 4 // kv_heads
    expected = F.scaled_dot_product_attention(
        q,
        k.repeat_interleave(repeat, 1),
        v.repeat_interleave(repeat, 1),
        attn_mask=block_causal_mask(positions),
        scale=0.3,
    ).transpose(1, 2)
    torch.testing.assert_close(ours, expected)


def test_the_varlen_call_holds_the_kernel_layout():
    q = torch.randn(1, 4, 6, 8)
    k = torch.randn(1, 2, 6, 8)
    call = VarlenCall.of(q, k, k, PackedSegments.of([2, 4], q.device), 0.5)
    assert call.query.shape == call.key.shape == (6, 4, 8)
    assert torch.equal(call.key[:, 1], k[0, 0]) and torch.equal(call.key[:, 2], k[0, 1])
    assert call.cu_seqlens.tolist() == [0, 2, 6] and call.max_length == 4 and call.scale == 0.5
