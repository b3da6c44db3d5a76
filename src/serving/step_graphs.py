"""The batched decode step over static buffers: compiled and replayed as a CUDA graph where
CUDA is, its tokens read back while the next step runs.

A decode step of a 7B model is some 3,000 small kernels; launched one by one from Python on
a GPU they cost more than the arithmetic (the single-stream decoder measured 39 tokens/s
eager and 89 graphed on an H200). So the scheduler's step runs on fixed shapes: the rows
padded to a power of two (at most the pool's rows), attending to a power of two of KV
positions (at least MIN_ATTENDED, at most the pool's length: short chats in a long pool do
not read its whole length), over the rows' device buffers (src/serving/batch_step.DecodeRows)
and the adapter slots (src/serving/adapter_stack.py). On a GPU one CUDA graph per (rows,
attended length) is captured the first time it is needed, as gpt-fast and vLLM do; adapters
coming and going do not change it (they are written into its slots). Padded rows decode
token 0 at position 0 of rows no stream holds (their output is dropped; a stream taking
such a row writes its prompt over it).

With PREDICT_COMPILE (auto: on CUDA) the step is compiled by torch.compile first, so that
the elementwise work of each layer runs fused inside the graph. Its tokens are copied to
host memory without waiting (`LaunchedStep`): the host reads them while the next step runs.

Everything but the capture is the same code on every device: on a CPU the step runs eagerly
over the same buffers, which is how the tests check what a GPU replays. A compile or a
capture that fails for another reason than memory falls back (eager, or without graphs) for
good, said once in the log.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from src.inputs import auto_switch
from src.log import log
from src.serving.adapter_stack import AdapterStack
from src.serving.batch_step import DecodeRows, KVPool, decode_step

WARMUP_STEPS = 2  # CUDA graphs need the kernels' lazy set-up done before capture
MIN_ATTENDED = 256
COMPILE_VARIABLE = "PREDICT_COMPILE"  # auto (default): on CUDA; 1: always; 0: never


def compile_wanted(device: torch.device) -> bool:
    setting = auto_switch(COMPILE_VARIABLE)
    return device.type == "cuda" if setting == "auto" else setting == "1"


@dataclass(frozen=True)
class StepInputs:
    """What one step runs over: the model, its adapter stack, the KV pool, the views of the
    rows it runs (padded) and the KV positions it attends to."""

    model: torch.nn.Module
    stack: AdapterStack | None
    pool: KVPool
    rows: DecodeRows
    attended: int


@dataclass
class StepGraph:
    """A step over static inputs (the rows' buffers): `replay`, then read `tokens`."""

    inputs: StepInputs  # (the pool and stack kept alive while the graph is)
    tokens: torch.Tensor | None  # (rows,), overwritten by every replay
    logits: torch.Tensor | None  # (rows, V), likewise
    replay: Callable[[], None]


@dataclass
class LaunchedStep:
    """A step on its way: its tokens land in host memory when the device gets there."""

    tokens: torch.Tensor  # (active,) on the host
    done: torch.cuda.Event | None
    logits: torch.Tensor | None  # (active, V): only when asked for (tests, benchmarks)

    def read(self) -> list[int]:
        if self.done is not None:
            self.done.synchronize()
        return self.tokens.tolist()


def padded_rows(active: int, pool_rows: int) -> int:
    """The rows a step runs: a power of two at least `active`, at most the pool's rows."""
    rows = 1
    while rows < active:
        rows *= 2
    return min(rows, pool_rows)


def attended_length(last_position: int, pool_length: int) -> int:
    """The KV positions a step attends to: a power of two past `last_position`, at least
    MIN_ATTENDED, at most the pool's length."""
    length = MIN_ATTENDED
    while length <= last_position:
        length *= 2
    return min(length, pool_length)


class BatchedDecoder:
    """Runs the scheduler's decode steps: one graph per (rows, attended) on the current pool."""

    def __init__(
        self,
        device: torch.device,
        eos_token_id: int,
        graphs: bool | None = None,
        compiled: bool | None = None,
    ) -> None:
        self.device = device
        self.eos_token_id = eos_token_id
        self.use_graphs = device.type == "cuda" if graphs is None else graphs
        self.use_compile = compile_wanted(device) if compiled is None else compiled
        self.compiled_step: Callable | None = None
        self.steps: dict[tuple[int, int], StepGraph] = {}
        self.built_for: tuple | None = None  # (model, pool, stack version) of the steps
        self.memory_pool: tuple[int, int] | None = None  # one for all the graphs
        self.captures = 0

    def launch(
        self,
        model: torch.nn.Module,
        stack: AdapterStack | None,
        pool: KVPool,
        rows: DecodeRows,
        active: int,
        last_position: int,
        keep_logits: bool = False,
    ) -> LaunchedStep:
        """Enqueue the next token of rows 0..active-1; read it from the LaunchedStep."""
        padded = padded_rows(active, pool.rows)
        attended = attended_length(last_position, pool.length)
        step = self._step_for(StepInputs(model, stack, pool, rows.first(padded), attended))
        step.replay()
        assert step.tokens is not None and step.logits is not None
        logits = step.logits[:active].clone() if keep_logits else None
        if self.device.type != "cuda":
            return LaunchedStep(step.tokens[:active].clone(), None, logits)
        host = torch.empty(active, dtype=torch.int64, pin_memory=True)
        host.copy_(step.tokens[:active], non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return LaunchedStep(host, done, logits)

    def reset(self) -> None:
        """Forget the steps (a new pool, model or stack). A replay still running on the GPU
        (the step in flight) finishes first: its graph and buffers go with the steps."""
        if self.steps and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.steps, self.built_for = {}, None
        # a graph pool whose graphs are all gone cannot take a new capture: a fresh one
        self.memory_pool = None

    def _step_for(self, inputs: StepInputs) -> StepGraph:
        stack = inputs.stack
        built_for = (
            id(inputs.model), id(inputs.pool), inputs.rows.tokens.data_ptr(), id(stack),
            stack and stack.version,
        )  # fmt: skip
        if built_for != self.built_for:  # a new pool (grown, after an idle spell), model or stack
            self.reset()
            self.built_for = built_for
        key = (inputs.rows.tokens.shape[0], inputs.attended)
        if key not in self.steps:
            self.steps[key] = self._build(inputs)
        return self.steps[key]

    def _function(self) -> tuple[Callable, bool]:
        """The step to run (compiled or not) and whether it samples with per-row shortcuts
        (a CPU's eager step only: they read the rows' settings on the host)."""
        if not self.use_compile:
            return decode_step, self.device.type == "cpu"
        if self.compiled_step is None:
            # shapes that change (rows, attended length, the pool's) compile once more, then
            # as dynamic dimensions (torch.compile's automatic dynamic shapes)
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self.compiled_step = torch.compile(decode_step, fullgraph=True)
        return self.compiled_step, False

    def _build(self, inputs: StepInputs) -> StepGraph:
        step = StepGraph(inputs, None, None, lambda: None)
        function, shortcuts = self._function()
        model, stack, pool, rows, attended = (
            inputs.model,
            inputs.stack,
            inputs.pool,
            inputs.rows,
            inputs.attended,
        )

        def run() -> None:
            step.tokens, step.logits = function(
                model, stack, pool, rows, attended, self.eos_token_id, shortcuts
            )

        if self.use_compile:
            try:
                with torch.inference_mode():
                    self._without_advancing(rows, run)  # compiles (graph breaks raise here)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as error:  # an operation the compiler cannot take, on some stack
                log(f"note: decoding without torch.compile ({_first_line(error)})")
                self.use_compile = False
                return self._build(inputs)
        if self.use_graphs:
            try:
                self._capture(step, rows, run)
                return step
            except torch.cuda.OutOfMemoryError:
                raise  # not a reason to give up graphs for good
            except RuntimeError as error:  # a kernel that cannot be captured, on some stack
                log(f"note: batched decoding without CUDA graphs ({_first_line(error)})")
                self.use_graphs = False
                return self._build(inputs)

        def replay() -> None:
            with torch.inference_mode():
                try:
                    run()
                except Exception as error:
                    if not self.use_compile:
                        raise
                    # a recompile (a new shape) that fails: eager from now on, this step too
                    log(f"note: decoding without torch.compile ({_first_line(error)})")
                    self.use_compile = False
                    step.tokens, step.logits = decode_step(
                        model, stack, pool, rows, attended, self.eos_token_id,
                        self.device.type == "cpu",
                    )  # fmt: skip
                    self.reset()  # the other compiled steps go: built again, eager

        step.replay = replay
        return step

    @staticmethod
    def _without_advancing(rows: DecodeRows, run: Callable[[], None], times: int = 1) -> None:
        """Run the step `times` and put the rows' state back: what a warm-up or a compile
        sampled is forgotten (the keys and values it wrote at later positions are masked
        until the real steps write them)."""
        saved = [t.clone() for t in _tensors(rows)]
        for _ in range(times):
            run()
        for tensor, before in zip(_tensors(rows), saved, strict=True):
            tensor.copy_(before)

    def _capture(self, step: StepGraph, rows: DecodeRows, run: Callable[[], None]) -> None:
        """Capture the step on its buffers, after warm-up steps whose effect on the rows is
        undone.

        Through CUDAGraph's own capture_begin/capture_end rather than `torch.cuda.graph`,
        whose entry synchronizes the device, runs Python's garbage collector and empties the
        allocator's cache: a capture here happens while streams are waiting for their next
        token, so it costs the warm-up steps and the recording, nothing more."""
        self.captures += 1
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        self.memory_pool = self.memory_pool or torch.cuda.graph_pool_handle()
        with torch.cuda.stream(side), torch.inference_mode():
            self._without_advancing(rows, run, WARMUP_STEPS)
            # thread_local: CUDA work of another thread (an adapter loading) does not spoil it
            graph.capture_begin(pool=self.memory_pool, capture_error_mode="thread_local")
            try:
                run()
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        step.replay = graph.replay


def _tensors(rows: DecodeRows) -> list[torch.Tensor]:
    sampling = rows.sampling
    return [rows.tokens, rows.positions, sampling.produced, sampling.seen]


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]
