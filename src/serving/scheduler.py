"""Continuous batching: one thread owns the model and decodes every active stream together.

Cog runs concurrent predictions as coroutines on one asyncio thread; the model's work must
not run there (it would stall every slot), and two requests must never share its state
halfway. So requests hand their stream to this scheduler, which alone touches the model:

    loop:  take new streams -> drop the canceled -> admit waiting streams (prefill each
           alone, its first token) -> enqueue one decode step for all active rows (it
           samples each row's token on the device) -> hand each row its token of the step
           before; rows that ended leave

A stream waits in the queue (its first token comes later; it is not refused) while the KV
cache budget has no room for its length bucket, while every adapter the cache may hold is
in use by other streams, or while an adapter loads (off this thread: the active rows keep
decoding meanwhile; src/serving/chat.py). Tokens go back through a Channel the request reads, from a
thread or a coroutine; a request that stops reading (a stop sequence, a client gone, a
cancel) marks its stream canceled and the stream leaves at the next step.

On a GPU the host reads a step's tokens only once the next step is enqueued (`pipelined`),
so the device never waits for the host between two steps; a row that ended in the step
read runs one step more, whose token is dropped. On a CPU a step is computed when it is
called, so its tokens are read at once (the same code, in the other order; both tested).
"""

import asyncio
import contextlib
import queue
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from src.log import log
from src.serving.adapter_stack import AdapterStack, largest_rank
from src.serving.batch_step import DecodeRows, KVPool, kv_bytes_per_token, prefill
from src.serving.model_thread import ModelThread
from src.serving.sampling import SamplingSettings, sample_rows
from src.serving.step_graphs import BatchedDecoder, LaunchedStep

MIN_BUCKET = 256
MAX_PREFILLS_PER_STEP = 4  # prompts run between two steps (each pauses the running streams)
# What a stream's admit() answers: run it; wait, and let those behind it pass (its adapter
# has no slot); wait, and no prompt runs (an adapter is loading into the model)
READY, WAIT_FOR_ADAPTER_SLOT, WAIT_FOR_LOAD = "ready", "adapter slot", "load"
IDLE_POLL_S = 0.05  # no row to step, a stream waiting: how often to look again
END = object()  # the channel's last item after the tokens


class Channel:
    """Token ids from the scheduler thread to one request: read from a thread (`get`) or
    from a coroutine on `loop` (`aget`). Then END, or the exception the stream failed with."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop
        self.items: queue.SimpleQueue | asyncio.Queue = (
            asyncio.Queue() if loop else queue.SimpleQueue()
        )

    def put(self, item: Any) -> None:
        if self.loop is None:
            self.items.put(item)
            return
        with contextlib.suppress(RuntimeError):  # the request's loop is gone: nobody reads
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)

    def get(self) -> Any:
        return self.items.get()

    async def aget(self) -> Any:
        return await self.items.get()


@dataclass
class Stream:
    """One request's answer inside the scheduler."""

    prompt_ids: list[int]
    settings: SamplingSettings
    seed: int  # what its tokens are drawn with (sampling.sampling_seed)
    adapter: str | None  # the peft adapter it runs with, None for the plain base
    bucket: int  # KV slots it may fill: prompt and new tokens, rounded up
    channel: Channel
    # Ready to run? READY (its adapter loaded and pinned), WAIT_FOR_ADAPTER_SLOT or
    # WAIT_FOR_LOAD; raises: the stream fails
    admit: Callable[[], str] = lambda: READY
    # Called once when it leaves, admitted or not (unpins what admit pinned)
    release: Callable[[bool], None] = lambda admitted: None
    canceled: bool = False
    keep_first_logits: bool = False  # for fidelity checks: the logits of its first token
    first_logits: torch.Tensor | None = field(default=None, repr=False)
    position: int = 0  # where its next token goes in its row (after the steps launched)
    produced: int = 0  # tokens handed to its channel, or EOS
    admitted: bool = field(default=False, repr=False)
    left: bool = field(default=False, repr=False)

    def cancel(self) -> None:
        """Leave at the next step (safe from any thread)."""
        self.canceled = True

    def accept(self, token: int, eos_token_id: int) -> bool:
        """Its next token: to its reader, unless EOS. Whether the stream goes on."""
        self.produced += 1
        if token == eos_token_id:
            return False
        self.channel.put(token)
        return self.produced < self.settings.max_new_tokens


class ServedModel(Protocol):
    """What the scheduler needs of the chat model: the model, and the adapter made active
    for a prefill (peft's active adapter: only the scheduler thread changes it)."""

    model: torch.nn.Module

    def activate_for_prefill(self, adapter: str | None) -> Any: ...


def bucket_of(tokens: int, context_window: int) -> int:
    """The KV length a stream of `tokens` reserves: a power of two from 256, at most the
    context window (so short chats leave room for many rows)."""
    bucket = MIN_BUCKET
    while bucket < tokens:
        bucket *= 2
    return min(bucket, context_window)


class Scheduler:
    """The one thread that runs the model: admits streams, steps them together."""

    def __init__(
        self,
        served: ServedModel,
        max_rows: int,
        kv_budget_bytes: int,
        eos_token_id: int,
        adapter_slots: int,
        model_thread: ModelThread | None = None,
        pipelined: bool | None = None,
    ) -> None:
        self.served = served
        self.max_rows = max_rows
        self.kv_budget_bytes = kv_budget_bytes
        config = served.model.config
        self.config = config
        parameter = next(served.model.parameters())
        self.device = parameter.device
        self.kv_dtype = _compute_dtype(served.model)
        self.bytes_per_token = kv_bytes_per_token(config) * self.kv_dtype.itemsize
        self.inbox: queue.SimpleQueue[Stream | None] = queue.SimpleQueue()  # None: wake up
        self.waiting: deque[Stream] = deque()
        self.active: list[Stream] = []  # active[i] decodes in row i of the pool
        self.pool: KVPool | None = None
        self.eos_token_id = eos_token_id
        self.adapter_slots = adapter_slots
        self.stack: AdapterStack | None = None  # built when a row first uses an adapter
        self.decoder = BatchedDecoder(self.device, eos_token_id)
        self.pipelined = self.device.type == "cuda" if pipelined is None else pipelined
        self.in_flight: tuple[list[Stream], LaunchedStep] | None = None
        self.steps = 0
        self.most_rows = 0  # the most rows a step has run (the benchmarks and tests read it)
        # the loop runs on the thread that loaded the model (src/serving/model_thread.py),
        # and its buffers are made there: filling them is parallel CPU work too
        self.model_thread = model_thread or ModelThread("decode-scheduler")
        self.rows = self.model_thread.run(
            lambda: DecodeRows.empty(max_rows, config.vocab_size, self.device)
        )
        self.model_thread.start(self._run, self.wake)

    def submit(self, stream: Stream) -> Stream:
        self.inbox.put(stream)
        return stream

    # the loop

    def wake(self) -> None:
        """Look at the queue again now (an adapter finished loading)."""
        self.inbox.put(None)

    def _run(self) -> None:
        while True:
            try:
                self.model_thread.run_pending()  # other threads' model work (adapter checks)
                self._take_new()
                self._drop_canceled()
                self._admit_waiting()
                self._step()
            except Exception as error:  # a fault of the step itself: every active row fails
                log(f"decode step failed: {type(error).__name__}: {error}")
                traceback.print_exc()
                for stream in self.active:
                    self._leave(stream, error)
                self.active, self.pool, self.in_flight = [], None, None
                self.decoder.reset()

    def _take_new(self) -> None:
        """New streams into the queue; with no row to step, wait for one (or for the head of
        the queue to become ready: a wake-up, or a short poll for a cancel)."""
        try:
            if not self.active:
                item = self.inbox.get(timeout=IDLE_POLL_S if self.waiting else None)
                if item is not None:
                    self.waiting.append(item)
            while True:
                item = self.inbox.get_nowait()
                if item is not None:
                    self.waiting.append(item)
        except queue.Empty:
            pass

    def _drop_canceled(self) -> None:
        for stream in [s for s in self.waiting if s.canceled]:
            self.waiting.remove(stream)
            self._leave(stream)
        for stream in [s for s in self.active if s.canceled]:
            self._remove_row(stream)

    def _admit_waiting(self) -> None:
        """First come, first served for memory: the head of the queue waits for KV room and
        the rest behind it. A stream whose adapter has no slot (every one the cache holds in
        use) lets those behind it pass; while an adapter loads no prompt runs."""
        admitted = 0
        for stream in list(self.waiting):
            if len(self.active) >= self.max_rows or admitted == MAX_PREFILLS_PER_STEP:
                return
            shape = self._pool_shape(stream)
            if shape is None:  # no KV room: wait for rows to leave
                return
            try:
                ready = stream.admit()
                if ready == WAIT_FOR_LOAD:
                    return
                if ready == WAIT_FOR_ADAPTER_SLOT:
                    continue
                stream.admitted = True
                self.waiting.remove(stream)
                admitted += 1
                self._start(stream, shape)
            except Exception as error:  # this request's fault (its adapter, its prompt)
                if stream in self.waiting:
                    self.waiting.remove(stream)
                self._leave(stream, error)

    def _pool_shape(self, stream: Stream) -> tuple[int, int] | None:
        """The KV pool's (rows, length) once `stream` joins, within the budget; None: no room.

        The pool as it is while it has room. Else a new one: as many rows as the budget holds
        at its length (so that more streams join it without another copy), its length the
        longest bucket running; while the running rows are copied over, the old pool counts
        too. A stream alone always runs (a fresh pool, the idle one given up)."""
        pool, needed = self.pool, len(self.active) + 1
        if pool is not None and needed <= pool.rows and stream.bucket <= pool.length:
            return pool.rows, pool.length
        copying = pool is not None and bool(self.active)
        length = max(stream.bucket, pool.length) if copying else stream.bucket
        room = self.kv_budget_bytes - (pool.nbytes if copying and pool is not None else 0)
        rows = min(self.max_rows, room // (length * self.bytes_per_token))
        if not self.active:
            return max(1, rows), length
        return (rows, length) if rows >= needed else None

    def _start(self, stream: Stream, shape: tuple[int, int]) -> None:
        """The prompt alone (exactly the model's logits for the first token), its first token
        sampled as every later one, and its keys, values and state into the next row of a
        pool of `shape`."""
        with self.served.activate_for_prefill(stream.adapter):
            logits, cache = prefill(self.served.model, stream.prompt_ids)
        if stream.keep_first_logits:
            stream.first_logits = logits.clone()
        row = len(self.active)
        sampling = self.rows.sampling
        sampling.set_row(row, stream.settings, stream.seed, stream.prompt_ids)
        token = sample_rows(logits, sampling.rows(row, row + 1), self.eos_token_id, True)
        if not stream.accept(int(token.item()), self.eos_token_id):  # (the first token's wait)
            self._leave(stream)
            return
        slot = self._slot_for(stream.adapter)
        rows, length = shape
        if self.pool is None or not self.active:
            if self.pool is None or (self.pool.rows, self.pool.length) != shape:
                self.pool = None  # the idle pool goes (its step graphs too)
                self.decoder.reset()
                self.pool = KVPool.empty(self.config, rows, length, self.kv_dtype, self.device)
        elif (self.pool.rows, self.pool.length) != shape:  # (its step graphs go with it)
            self.pool = self.pool.resized(self.config, rows, length, keep=row)
        self.pool.write_prompt(row, cache)
        stream.position = len(stream.prompt_ids)
        self.rows.start(row, int(token), stream.position, slot)
        self.active.append(stream)

    def _slot_for(self, adapter: str | None) -> int:
        """The stack slot of a stream's adapter (-1: the plain base), its weights written
        there if they are not. (No adapter loads meanwhile: admit() said READY.)"""
        if adapter is None:
            return -1
        if self.stack is not None and adapter in self.stack.slot_of:
            return self.stack.slot_of[adapter]
        running = {s.adapter for s in self.active if s.adapter is not None}
        needed = len(running | {adapter})
        stack = self.stack
        if stack is None or needed > stack.capacity or not stack.covers(self.served.model, adapter):
            self._build_stack(needed)
        assert self.stack is not None
        return self.stack.assign(adapter, keep=running)

    def _build_stack(self, needed: int) -> None:
        """Slots for the adapters running at once (a step reads every slot: no more than
        needed, at most `adapter_slots`), as wide as the largest rank loaded, over every
        adapted projection; the running rows' adapters written into them again, their rows
        pointed at them."""
        old = self.stack
        rank = max(largest_rank(self.served.model), old.rank_capacity if old else 0)
        slots = min(self.adapter_slots, max(needed, old.capacity if old else 0))
        self.stack = AdapterStack.build(self.served.model, slots, rank)
        self.stack.version = old.version + 1 if old else 0
        running = {s.adapter for s in self.active if s.adapter is not None}
        for row, stream in enumerate(self.active):
            if stream.adapter is not None:
                self.rows.slots[row] = self.stack.assign(stream.adapter, running)

    def forget_adapter(self, adapter: str) -> None:
        """An adapter no longer loaded: its slot is free."""
        if self.stack is not None:
            self.stack.release(adapter)

    def _step(self) -> None:
        """Enqueue a step of the active rows; hand out the tokens of the one before (or, not
        pipelined, of this one)."""
        launched = None
        if self.active:
            assert self.pool is not None
            launched = (list(self.active), self._launch())
        if self.in_flight is not None:
            self._deliver(*self.in_flight)
            self.in_flight = None
        if launched is not None:
            if self.pipelined:
                self.in_flight = launched
            else:
                self._deliver(*launched)

    def _launch(self) -> LaunchedStep:
        assert self.pool is not None
        last_position = max(s.position for s in self.active)
        launched = self.decoder.launch(
            self.served.model, self.stack, self.pool, self.rows, len(self.active), last_position
        )
        for stream in self.active:
            stream.position += 1
        self.steps += 1
        self.most_rows = max(self.most_rows, len(self.active))
        return launched

    def _deliver(self, streams: list[Stream], launched: LaunchedStep) -> None:
        """Each stream of a step its token; those that ended leave (a stream that left
        meanwhile, in a step that was already on its way, gets nothing)."""
        tokens = launched.read()
        for stream, token in zip(streams, tokens, strict=True):
            if stream.left or stream.canceled:
                continue
            if not stream.accept(token, self.eos_token_id):
                self._remove_row(stream)

    def _remove_row(self, stream: Stream) -> None:
        """The stream leaves; the last row moves into its place (the rows stay packed)."""
        row, last = self.active.index(stream), len(self.active) - 1
        if row != last and self.pool is not None:
            self.pool.move_row(last, row)
            self.rows.move_row(last, row)
        self.rows.clear(last)
        self.active[row] = self.active[last]
        self.active.pop()
        self._leave(stream)
        if not self.active and self.pool is not None and self.pool.length > MIN_BUCKET:
            # a long chat's pool goes (its memory); a short one stays, and with it the step
            # graphs captured on it
            self.pool = None
            self.decoder.reset()

    def _leave(self, stream: Stream, error: BaseException | None = None) -> None:
        stream.left = True
        try:
            stream.release(stream.admitted)
        finally:
            stream.admitted = False
            stream.channel.put(error if error is not None else END)


def _compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the activations (and so of the KV cache): the embedding's."""
    return model.get_input_embeddings().weight.dtype
