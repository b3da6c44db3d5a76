"""The batched decode step over static buffers, replayed as a CUDA graph where CUDA is.

A decode step of a 7B model is some 3,000 small kernels; launched one by one from Python on
a GPU they cost more than the arithmetic (the single-stream decoder, src/serving/decoding.py,
measured 39 tokens/s eager and 89 graphed on an H200). So the scheduler's step runs on
fixed shapes: the rows padded to a power of two (at most the pool's rows), its inputs
written into buffers the step reads, and on a GPU one CUDA graph per (rows, adapters in the
batch) over the current KV pool, captured the first time it is needed, as gpt-fast and
vLLM do. Padded rows decode token 0 at position 0 of rows no stream holds (their output is
dropped; a stream taking such a row writes its prompt over it).

Everything but the capture is the same code on every device: on a CPU the step runs eagerly
over the same buffers, which is how the tests check what a GPU replays. A capture that fails
for another reason than memory turns graphs off for good, said once in the log.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from src.log import log
from src.serving.batch_step import KVPool, StepRows, decode_step

WARMUP_STEPS = 2  # CUDA graphs need the kernels' lazy set-up done before capture


@dataclass
class StepGraph:
    """A step over static inputs: write them (`load`), `replay`, read `logits`."""

    inputs: StepRows  # the buffers the step reads
    pool: KVPool  # the pool it was captured on (kept alive while the graph is)
    model: torch.nn.Module
    logits: torch.Tensor | None  # (rows, V), overwritten by every replay
    replay: Callable[[], None]

    def load(self, rows: StepRows) -> None:
        self.inputs.tokens.copy_(rows.tokens)
        self.inputs.positions.copy_(rows.positions)
        self.inputs.adapter_masks.copy_(rows.adapter_masks)


def padded_rows(active: int, pool_rows: int) -> int:
    """The rows a step runs: a power of two at least `active`, at most the pool's rows."""
    rows = 1
    while rows < active:
        rows *= 2
    return min(rows, pool_rows)


class BatchedDecoder:
    """Runs the scheduler's decode steps: graphs by (rows, adapters) on the current pool."""

    def __init__(self, device: torch.device, graphs: bool | None = None) -> None:
        self.device = device
        self.use_graphs = device.type == "cuda" if graphs is None else graphs
        self.steps: dict[tuple[int, tuple[str, ...]], StepGraph] = {}
        self.memory_pool: tuple[int, int] | None = None  # one for all the graphs
        self.captures = 0

    def step(
        self,
        model: torch.nn.Module,
        pool: KVPool,
        tokens: list[int],
        positions: list[int],
        row_adapters: list[str | None],
    ) -> torch.Tensor:
        """The next token's logits (len(tokens), V) of the active rows 0..n-1 of `pool`."""
        active = len(tokens)
        rows = padded_rows(active, pool.rows)
        pad = rows - active
        slots = tuple(sorted({name for name in row_adapters if name is not None}))
        inputs = StepRows.build(
            tokens + [0] * pad, positions + [0] * pad, row_adapters + [None] * pad,
            slots, self.device,
        )  # fmt: skip
        step = self._step_for(model, pool, rows, slots, inputs)
        step.load(inputs)
        step.replay()
        assert step.logits is not None
        return step.logits[:active].clone()  # the next replay overwrites the buffer

    def forget(self, adapter: str) -> None:
        """Drop the steps of an adapter no longer loaded (a later one of the same name
        would otherwise replay the modules it replaced)."""
        self.steps = {key: s for key, s in self.steps.items() if adapter not in key[1]}

    def _step_for(
        self,
        model: torch.nn.Module,
        pool: KVPool,
        rows: int,
        slots: tuple[str, ...],
        inputs: StepRows,
    ) -> StepGraph:
        if any(s.pool is not pool or s.model is not model for s in self.steps.values()):
            self.steps = {}  # a new pool (grown, or after an idle spell) or a new model
        key = (rows, slots)
        if key not in self.steps:
            self.steps[key] = self._build(model, pool, inputs)
        return self.steps[key]

    def _build(self, model: torch.nn.Module, pool: KVPool, inputs: StepRows) -> StepGraph:
        buffers = StepRows(
            inputs.tokens.clone(), inputs.positions.clone(), inputs.adapter_masks.clone(),
            inputs.adapter_names,
        )  # fmt: skip
        step = StepGraph(buffers, pool, model, None, lambda: None)
        if self.use_graphs:
            try:
                self._capture(step)
                return step
            except torch.cuda.OutOfMemoryError:
                raise  # not a reason to give up graphs for good
            except RuntimeError as error:  # a kernel that cannot be captured, on some stack
                log(f"note: batched decoding without CUDA graphs ({str(error).splitlines()[0]})")
                self.use_graphs = False

        def replay() -> None:  # eager, over the same buffers; the output buffer is new
            step.logits = decode_step(step.model, step.pool, step.inputs)

        step.replay = replay
        return step

    def _capture(self, step: StepGraph) -> None:
        """Capture the step on its buffers. The warm-up steps write the rows' keys and values
        at their current positions, which the real step then writes again, the same.

        Through CUDAGraph's own capture_begin/capture_end rather than `torch.cuda.graph`,
        whose entry synchronizes the device, runs Python's garbage collector and empties the
        allocator's cache: a capture here happens while streams are waiting for their next
        token, so it costs the warm-up steps and the recording, nothing more."""
        self.captures += 1
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        self.memory_pool = self.memory_pool or torch.cuda.graph_pool_handle()
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                decode_step(step.model, step.pool, step.inputs)
            # thread_local: CUDA work of another thread (an adapter loading) does not spoil it
            graph.capture_begin(pool=self.memory_pool, capture_error_mode="thread_local")
            try:
                step.logits = decode_step(step.model, step.pool, step.inputs)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        step.replay = graph.replay
