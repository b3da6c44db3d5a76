"""Attention for packed rows without a mask: every segment attends causally to itself only.

A row holds segments (examples, or fragments of them) whose position ids restart at 0. The
usual way to isolate them, a block-diagonal mask over the whole row, makes PyTorch's sdpa fall
back to its math kernel, which stores a (heads, L, L) score matrix per layer for the backward
pass: memory and time grow with the square of the row length. Here the segments never meet:

- on a GPU, PyTorch's varlen flash kernel (`torch.nn.attention.varlen.varlen_attn`) takes the
  whole row with the cumulative segment lengths, built once per micro-batch in
  src/training/batching.collate, so no layer waits for the host;
- elsewhere (CPU, fp32, or a torch without the kernel), the row is split into its segments
  with `torch.split` and each goes through sdpa with `is_causal=True`. (Slicing instead of
  splitting makes autograd allocate a zero-filled full-size gradient per slice: ten times
  slower on a CPU.)

Where flash-attn is installed on a GPU, src/modeling.py selects transformers' own
flash_attention_2 instead. Decoding with the KV cache (one query position) attends to the
whole cache, as plain sdpa does.
"""

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

NAME = "packed_sdpa"
VARLEN_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class PackedSegments:
    """Where the segments of a micro-batch (1, N) start and end, on the host and the device."""

    lengths: tuple[int, ...]
    cu_seqlens: torch.Tensor  # (S + 1,) int32: 0, then the running sum of the lengths
    max_length: int

    @classmethod
    def of(cls, lengths: list[int] | tuple[int, ...], device: torch.device) -> "PackedSegments":
        bounds = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        if device.type == "cuda":  # a copy from pageable memory waits for the host
            bounds = bounds.pin_memory()
        return cls(tuple(lengths), bounds.to(device, non_blocking=True), max(lengths))


def segment_lengths(positions: torch.Tensor) -> list[int]:
    """Lengths of the runs of position ids that start at 0, for one row (syncs with the host)."""
    starts = (positions == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    ends = [*starts[1:], positions.numel()]
    return [end - start for start, end in zip(starts, ends, strict=True)]


def varlen_causal_kwargs(function: Callable[..., torch.Tensor]) -> dict[str, object] | None:
    """How this torch's varlen_attn asks for causal attention: torch 2.11 takes `is_causal`,
    2.13 `window_size=(-1, 0)` (a tuple: a list silently means non-causal). None: neither."""
    parameters = inspect.signature(function).parameters
    if "window_size" in parameters:
        return {"window_size": (-1, 0)}
    if "is_causal" in parameters:
        return {"is_causal": True}
    return None


@functools.cache
def causal_varlen_kernel() -> Callable[..., torch.Tensor] | None:
    """varlen_attn with causal attention set, or None where torch has no usable one."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    causal = varlen_causal_kwargs(varlen_attn)
    return None if causal is None else functools.partial(varlen_attn, **causal)


def varlen_supported(query: torch.Tensor) -> bool:
    """The flash kernel needs CUDA compute capability 8.0+ and half precision."""
    return (
        query.is_cuda
        and query.dtype in VARLEN_DTYPES
        and torch.cuda.get_device_capability(query.device)[0] >= 8
        and causal_varlen_kernel() is not None
    )


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,  # (1, H, L, D)
    key: torch.Tensor,  # (1, H_kv, S, D)
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    packed_segments: PackedSegments | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface; returns (1, L, H, D)."""
    if attention_mask is not None:
        raise ValueError(f"{NAME} takes no attention mask: rows are isolated by position ids")
    gqa = query.shape[1] != key.shape[1]
    q_length, kv_length = query.shape[2], key.shape[2]
    if q_length != kv_length:
        if q_length != 1:
            raise ValueError(f"{NAME} decodes one position at a time with the KV cache")
        output = F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=gqa)
        return output.transpose(1, 2), None
    if query.shape[0] != 1:
        raise ValueError(f"{NAME} takes micro-batches laid end to end, shape (1, N)")
    if packed_segments is None:  # a caller that did not collate: read the segments here
        lengths = [q_length] if position_ids is None else segment_lengths(position_ids[0])
        packed_segments = PackedSegments.of(lengths, query.device)
    if dropout == 0.0 and varlen_supported(query):
        kernel = causal_varlen_kernel()
        assert kernel is not None  # varlen_supported checked it
        return VarlenCall.of(query, key, value, packed_segments, scaling).run(kernel), None
    return _split(query, key, value, packed_segments.lengths, dropout, scaling, gqa), None


@dataclass(frozen=True)
class VarlenCall:
    """The arguments of one varlen flash call, built where the CPU tests run: only `run` with
    the CUDA kernel is GPU-only. The kernel's contract: (L, H, D) query, key and value, the
    cumulative segment bounds for both, the longest segment for both, and the scale."""

    query: torch.Tensor  # (L, H, D)
    key: torch.Tensor  # (L, H, D): grouped-query heads repeated to the query's count
    value: torch.Tensor
    cu_seqlens: torch.Tensor  # (S + 1,) int32
    max_length: int
    scale: float | None

    @classmethod
    def of(
        cls,
        query: torch.Tensor,  # (1, H, L, D)
        key: torch.Tensor,  # (1, H_kv, L, D)
        value: torch.Tensor,
        segments: PackedSegments,
        scaling: float | None,
    ) -> "VarlenCall":
        if query.shape[1] != key.shape[1]:
            repeat = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        return cls(q, k, v, segments.cu_seqlens, segments.max_length, scaling)

    def run(self, kernel: Callable[..., torch.Tensor]) -> torch.Tensor:
        """(1, L, H, D), as transformers' attention interface returns it."""
        bounds, longest = self.cu_seqlens, self.max_length
        output = kernel(
            self.query, self.key, self.value, bounds, bounds, longest, longest, scale=self.scale
        )
        return output.unsqueeze(0)


def _split(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lengths: tuple[int, ...],
    dropout: float,
    scaling: float | None,
    gqa: bool,
) -> torch.Tensor:
    pieces = [
        F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa
        )
        for q, k, v in zip(*(t.split(lengths, dim=2) for t in (query, key, value)), strict=True)
    ]
    output = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]  # (1, H, L, D)
    return output.transpose(1, 2)


AttentionInterface.register(NAME, packed_sdpa)
