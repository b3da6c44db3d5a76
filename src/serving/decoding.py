"""Decode steps for the sampling loop: one forward pass per new token over a KV cache.

At batch 1 a decode step of a 7B model is some 700 small kernels; on a GPU launching them one
by one from Python costs more than the arithmetic (an H200 ran 39 tokens/s eagerly where its
memory bandwidth allows about 300). So on a GPU each step is replayed as one CUDA graph over
a static KV cache; on a CPU, where launches are cheap, transformers' dynamic cache is as
fast as `generate`.

  * EagerDecoder: a dynamic cache, any device.
  * GraphedDecoder: a static cache per length bucket (a power of two from 256 tokens to the
    context window, so a short chat does not attend over 4,096 empty slots), and one CUDA
    graph per (adapter, bucket), captured the first time it is needed: the active adapter's
    LoRA modules are part of the graph. Without CUDA it runs the same steps eagerly, which
    is how the tests check it on a CPU.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache, PreTrainedModel, StaticCache

from src.log import log

MIN_BUCKET = 256
WARMUP_STEPS = 2  # CUDA graphs need the kernels' lazy set-up done before capture


class Decoder(Protocol):
    @property
    def device(self) -> torch.device: ...

    def prefill(self, prompt_ids: list[int], new_tokens: int) -> torch.Tensor:
        """Run the prompt; return the next token's logits (1, V)."""
        ...

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Append `token` (1, 1); return the next token's logits (1, V)."""
        ...


class EagerDecoder:
    def __init__(self, model: PreTrainedModel | torch.nn.Module) -> None:
        self.model = model
        self.cache = DynamicCache()

    @property
    def device(self) -> torch.device:
        return _device(self.model)

    def prefill(self, prompt_ids: list[int], new_tokens: int) -> torch.Tensor:
        self.cache = DynamicCache()
        return self._forward(torch.tensor([prompt_ids], device=_device(self.model)))

    def step(self, token: torch.Tensor) -> torch.Tensor:
        return self._forward(token)

    def _forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        output = self.model(input_ids=input_ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        return output.logits[:, -1]


@dataclass
class StaticStep:
    """A decode step over static buffers: `token` and `position` are written, `replay` runs
    the step (a CUDA graph's replay, or the same step run eagerly over the same buffers, as
    on a CPU), and `logits` holds its output. Everything but the replay itself is the same
    code on every device, so a CPU test checks what a GPU replays from."""

    token: torch.Tensor  # (1, 1)
    position: torch.Tensor  # (1, 1)
    logits: torch.Tensor  # (1, 1, V), overwritten by every replay
    replay: Callable[[], object]

    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        self.token.copy_(token)
        self.position.fill_(position)
        self.replay()
        return self.logits[:, -1].clone()  # the next replay overwrites the buffer


class GraphedDecoder:
    """Static KV caches by length bucket; decode steps as CUDA graphs where CUDA is."""

    def __init__(
        self, model: torch.nn.Module, context_window: int, graphs: bool | None = None
    ) -> None:
        self.model = model
        self.context_window = context_window
        self.use_graphs = _device(model).type == "cuda" if graphs is None else graphs
        self.caches: dict[int, StaticCache] = {}
        self.graphs: dict[tuple[str, int], StaticStep] = {}
        self.pool: tuple[int, int] | None = None  # one memory pool for all the graphs
        self.adapter = "base"  # what the model computes now: the graphs' key
        self.bucket = MIN_BUCKET
        self.position = 0

    @property
    def device(self) -> torch.device:
        return _device(self.model)

    def use(self, model: torch.nn.Module, adapter: str) -> None:
        """The model (it changes once, when peft first wraps it) and its active adapter."""
        if model is not self.model:
            self.model, self.graphs = model, {}
        self.adapter = adapter

    def forget(self, adapter: str) -> None:
        """Drop the graphs of an adapter that is no longer loaded."""
        self.graphs = {key: g for key, g in self.graphs.items() if key[0] != adapter}

    def prefill(self, prompt_ids: list[int], new_tokens: int) -> torch.Tensor:
        """The prompt runs as in EagerDecoder (a dynamic cache, causal attention without a
        mask), so the first token's logits are exactly those of the model run plainly; its
        keys and values are then copied into the static cache the decode steps replay over."""
        self.bucket = self._bucket(len(prompt_ids) + new_tokens)
        self.position = len(prompt_ids)
        ids = torch.tensor([prompt_ids], device=_device(self.model))
        dynamic = DynamicCache()
        output = self.model(input_ids=ids, cache=dynamic, use_cache=True, logits_to_keep=1)
        static = self._cache(self.bucket)
        static.reset()
        for target, source in zip(static.layers, dynamic.layers, strict=True):
            if not target.is_initialized:
                target.lazy_initialization(source.keys, source.values)
            target.keys[:, :, : self.position].copy_(source.keys)
            target.values[:, :, : self.position].copy_(source.values)
            target.cumulative_length.fill_(self.position)
        return output.logits[:, -1]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        static = self._graph() if self.use_graphs else None
        logits = (static or self._eager_step())(token, self.position)
        self.position += 1
        return logits

    def _eager_step(self) -> StaticStep:
        """The step as a graph would replay it, run eagerly over the same static buffers."""
        device = _device(self.model)
        token = torch.zeros(1, 1, dtype=torch.long, device=device)
        position = torch.zeros(1, 1, dtype=torch.long, device=device)
        cache = self._cache(self.bucket)
        step = StaticStep(token, position, torch.empty(0), lambda: None)

        def replay() -> None:  # a graph writes its output buffer; here the buffer is new
            step.logits = self._step(cache, token, position)

        step.replay = replay
        return step

    def _bucket(self, tokens: int) -> int:
        bucket = MIN_BUCKET
        while bucket < tokens:
            bucket *= 2
        return min(bucket, self.context_window)

    def _cache(self, bucket: int) -> StaticCache:
        if bucket not in self.caches:
            self.caches[bucket] = StaticCache(config=self.model.config, max_cache_len=bucket)
        return self.caches[bucket]

    def _step(
        self, cache: StaticCache, token: torch.Tensor, position: torch.Tensor
    ) -> torch.Tensor:
        output = self.model(input_ids=token, position_ids=position, cache=cache, use_cache=True)
        return output.logits

    def _graph(self) -> StaticStep | None:
        key = (self.adapter, self.bucket)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(self._cache(self.bucket))
            except torch.cuda.OutOfMemoryError:
                raise  # not a reason to give up graphs for good
            except RuntimeError as error:  # a kernel that cannot be captured, on some stack
                log(f"note: decoding without CUDA graphs ({str(error).splitlines()[0]})")
                self.use_graphs = False
                return None
        return self.graphs[key]

    def _capture(self, cache: StaticCache) -> StaticStep:
        """Capture one decode step on `cache`, leaving its contents as they were."""
        device = _device(self.model)
        token = torch.zeros(1, 1, dtype=torch.long, device=device)
        position = torch.full((1, 1), self.position, dtype=torch.long, device=device)
        lengths = [layer.cumulative_length.clone() for layer in cache.layers]
        try:
            _on_side_stream(
                lambda: [self._step(cache, token, position) for _ in range(WARMUP_STEPS)]
            )
            graph = torch.cuda.CUDAGraph()
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            # thread_local: CUDA work of another thread does not spoil the capture
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                logits = self._step(cache, token, position)
        finally:
            for layer, length in zip(cache.layers, lengths, strict=True):
                layer.cumulative_length.copy_(length)  # the warm-up steps advanced it
        return StaticStep(token, position, logits, graph.replay)


def _on_side_stream(work: Callable[[], object]) -> None:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        work()
    torch.cuda.current_stream().wait_stream(stream)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
