"""Attention for packed rows without a mask: every segment attends causally to itself only.

A row holds segments (examples, or fragments of them) whose position ids restart at 0. The
usual way to isolate them, a block-diagonal mask over the whole row, makes PyTorch's sdpa fall
back to its math kernel, which stores a (heads, L, L) score matrix per layer for the backward
pass: memory and time grow with the square of the row length. Here each segment goes through
sdpa on its own with `is_causal=True`, which the fused (flash) kernels serve on CPU and GPU
alike: the cost is the sum of the segments' squares, and padding is never needed. This is
the varlen attention of FlashAttention-2, written with PyTorch's kernels; where
flash-attn is installed on a GPU, src/modeling.py uses it instead.

Decoding with the KV cache (one query position) attends to the whole cache, as plain sdpa does.
"""

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

NAME = "segmented_sdpa"


def segment_bounds(positions: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each run of position ids that starts at 0, for one row."""
    starts = (positions == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return list(zip(starts, [*starts[1:], positions.numel()], strict=True))


def segmented_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, H, L, D)
    key: torch.Tensor,  # (B, H_kv, S, D)
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    if attention_mask is not None:
        raise ValueError(f"{NAME} takes no attention mask: rows are isolated by position ids")
    gqa = query.shape[1] != key.shape[1]
    q_length, kv_length = query.shape[2], key.shape[2]
    if q_length != kv_length:
        if q_length != 1:
            raise ValueError(f"{NAME} decodes one position at a time with the KV cache")
        output = F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=gqa)
        return output.transpose(1, 2).contiguous(), None
    if position_ids is None:
        position_ids = torch.arange(q_length, device=query.device).expand(query.shape[0], -1)
    rows = []
    for row in range(query.shape[0]):
        pieces = [
            F.scaled_dot_product_attention(
                query[row : row + 1, :, start:end],
                key[row : row + 1, :, start:end],
                value[row : row + 1, :, start:end],
                dropout_p=dropout,
                is_causal=True,
                scale=scaling,
                enable_gqa=gqa,
            )
            for start, end in segment_bounds(position_ids[row])
        ]
        rows.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
    output = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]  # (B, H, L, D)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, segmented_sdpa)
