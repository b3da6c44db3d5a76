"""Continuous batching: one thread owns the model and decodes every active stream together.

Cog runs concurrent predictions as coroutines on one asyncio thread; the model's work must
not run there (it would stall every slot), and two requests must never share its state
halfway. So requests hand their stream to this scheduler, which alone touches the model:

    loop:  take new streams -> drop the canceled -> admit waiting streams (prefill each
           alone, its first token) -> one decode step for all active rows -> hand each
           row its token; rows that ended leave

A stream waits in the queue (its first token comes later; it is not refused) while the KV
cache budget has no room for its length bucket, while every adapter the cache may hold is
in use by other streams, or while an adapter loads (off this thread: the active rows keep
decoding meanwhile; src/serving/chat.py). Tokens go back through a Channel the request reads, from a
thread or a coroutine; a request that stops reading (a stop sequence, a client gone, a
cancel) marks its stream canceled and the stream leaves at the next step.
"""

import asyncio
import contextlib
import queue
import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from src.log import log
from src.serving.batch_step import KVPool, kv_bytes_per_token, prefill
from src.serving.generation import TokenSampler
from src.serving.step_graphs import BatchedDecoder

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
    sampler: TokenSampler
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
    position: int = 0  # where its next token goes in its row
    last_token: int = 0
    admitted: bool = field(default=False, repr=False)

    def cancel(self) -> None:
        """Leave at the next step (safe from any thread)."""
        self.canceled = True


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

    def __init__(self, served: ServedModel, max_rows: int, kv_budget_bytes: int) -> None:
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
        self.decoder = BatchedDecoder(self.device)
        self.steps = 0
        self.most_rows = 0  # the most rows a step has run (the benchmarks and tests read it)
        self.thread = threading.Thread(target=self._run, name="decode-scheduler", daemon=True)
        self.thread.start()

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
                self._take_new()
                self._drop_canceled()
                self._admit_waiting()
                if self.active:
                    self._step()
            except Exception as error:  # a fault of the step itself: every active row fails
                log(f"decode step failed: {type(error).__name__}: {error}")
                traceback.print_exc()
                for stream in self.active:
                    self._leave(stream, error)
                self.active, self.pool = [], None
                self.decoder.steps = {}

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
        """The prompt alone (exactly the model's logits for the first token), its first token,
        and its keys and values into the next row of a pool of `shape`."""
        with self.served.activate_for_prefill(stream.adapter):
            logits, cache = prefill(self.served.model, stream.prompt_ids)
        if stream.keep_first_logits:
            stream.first_logits = logits.clone()
        token = stream.sampler.next_token(logits)
        if token is None:
            self._leave(stream)
            return
        stream.channel.put(token)
        if stream.sampler.finished:
            self._leave(stream)
            return
        row = len(self.active)
        rows, length = shape
        if self.pool is None or not self.active:
            if self.pool is None or (self.pool.rows, self.pool.length) != shape:
                self.pool, self.decoder.steps = None, {}  # the idle pool goes (its graphs too)
                self.pool = KVPool.empty(self.config, rows, length, self.kv_dtype, self.device)
        elif (self.pool.rows, self.pool.length) != shape:  # (its step graphs go with it)
            self.pool = self.pool.resized(self.config, rows, length, keep=row)
        self.pool.write_prompt(row, cache)
        stream.position, stream.last_token = len(stream.prompt_ids), token
        self.active.append(stream)

    def _step(self) -> None:
        assert self.pool is not None
        logits = self.decoder.step(
            self.served.model,
            self.pool,
            [s.last_token for s in self.active],
            [s.position for s in self.active],
            [s.adapter for s in self.active],
        )
        self.steps += 1
        self.most_rows = max(self.most_rows, len(self.active))
        ended = []
        for index, stream in enumerate(self.active):
            token = stream.sampler.next_token(logits[index : index + 1])
            if token is not None:
                stream.channel.put(token)
                stream.position, stream.last_token = stream.position + 1, token
            if token is None or stream.sampler.finished:
                ended.append(stream)
        for stream in ended:
            self._remove_row(stream)

    def _remove_row(self, stream: Stream) -> None:
        """The stream leaves; the last row moves into its place (the rows stay packed)."""
        row, last = self.active.index(stream), len(self.active) - 1
        if row != last and self.pool is not None:
            self.pool.move_row(last, row)
        self.active[row] = self.active[last]
        self.active.pop()
        self._leave(stream)
        if not self.active and self.pool is not None and self.pool.length > MIN_BUCKET:
            # a long chat's pool goes (short chats would attend over its length); a short
            # one stays, and with it the step graphs captured on it
            self.pool, self.decoder.steps = None, {}

    def _leave(self, stream: Stream, error: BaseException | None = None) -> None:
        try:
            stream.release(stream.admitted)
        finally:
            stream.admitted = False
            stream.channel.put(error if error is not None else END)


def _compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the activations (and so of the KV cache): the embedding's."""
    return model.get_input_embeddings().weight.dtype
