"""How many requests the predictor serves at once, and how much memory their KV caches take.

Slots: Cog starts as many concurrent predictions as `COG_MAX_CONCURRENCY` says (read by
the server before setup; Replicate's runtime sets it from predict.py's `@cog.concurrent`
declaration, DEFAULT_SLOTS; `make serve` sets it; unset, Cog runs one at a time). Beyond the
slots Cog answers 409. The scheduler decodes up to that many streams in one step.

KV cache: each stream reserves its length bucket (src/serving/scheduler.bucket_of) of keys
and values, 2 x layers x kv heads x head dim values a token (0.5 MB for Llama-2-7B in
bf16). The budget is what the device has free after the model is loaded, less a reserve
for a step's own tensors, or `PREDICT_KV_CACHE_GIB`. A stream for which the budget has no
room waits for one to leave; a stream alone always runs.
"""

import os
from dataclasses import dataclass

import psutil
import torch

from src.errors import UserInputError
from src.serving.batch_step import kv_bytes_per_token

DEFAULT_SLOTS = 16  # concurrent predictions a 7B model on one GPU serves well
SLOTS_VARIABLE = "COG_MAX_CONCURRENCY"
KV_BUDGET_VARIABLE = "PREDICT_KV_CACHE_GIB"
GPU_RESERVE_SHARE = 0.1  # of the card, for a step's activations, logits and the allocator
CPU_SHARE = 0.25  # of the available host memory
GIB = 1024**3


@dataclass(frozen=True)
class ServingPlan:
    slots: int
    kv_budget_bytes: int
    bytes_per_token: int
    context_window: int
    device: str

    @classmethod
    def for_model(cls, model: torch.nn.Module, context_window: int) -> "ServingPlan":
        embedding = model.get_input_embeddings().weight
        per_token = kv_bytes_per_token(model.config) * embedding.dtype.itemsize
        return cls(
            slots=serving_slots(),
            kv_budget_bytes=kv_budget_bytes(embedding.device),
            bytes_per_token=per_token,
            context_window=context_window,
            device=embedding.device.type,
        )

    def rows_at(self, bucket: int) -> int:
        """Streams of `bucket` tokens decoding together (at least one)."""
        return max(1, min(self.slots, self.kv_budget_bytes // (bucket * self.bytes_per_token)))

    def describe(self) -> str:
        buckets = sorted({min(256, self.context_window), self.context_window})
        rows = ", ".join(f"{self.rows_at(b)} of {b:,} tokens" for b in buckets)
        return (
            f"serving: {self.slots} concurrent request{'s' if self.slots != 1 else ''} "
            f"({SLOTS_VARIABLE}), KV cache budget {self.kv_budget_bytes / GIB:.1f} GiB on "
            f"{self.device} ({self.bytes_per_token / 2**20:.2f} MiB a token): a decode step "
            f"takes up to {rows}"
        )


def serving_slots() -> int:
    value = os.environ.get(SLOTS_VARIABLE, "").strip()
    if not value:
        return 1
    if not value.isdigit() or int(value) < 1:
        raise UserInputError(f"{SLOTS_VARIABLE} must be a positive integer, got {value!r}")
    return int(value)


def kv_budget_bytes(device: torch.device) -> int:
    value = os.environ.get(KV_BUDGET_VARIABLE, "").strip()
    if value:
        try:
            gib = float(value)
        except ValueError:
            gib = -1.0
        if not gib > 0:
            raise UserInputError(f"{KV_BUDGET_VARIABLE} must be a positive number, got {value!r}")
        return int(gib * GIB)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return max(0, int(free - GPU_RESERVE_SHARE * total))
    return int(psutil.virtual_memory().available * CPU_SHARE)
