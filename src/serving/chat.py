"""The chat model behind predict.py: base model, trained adapters, prompt, streamed answer.

Adapters are served unmerged, as they were trained: the base weights are never written, and
the LoRA branch runs in fp32 beside them. In bf16 (the serving precision on a GPU) merging
would round much of a delta away (base weights of std 0.02 against a delta of rms 2e-4: on an
H200 the merged 7B model's logits were 2.3 times further from the trained model in fp32 than
the trained model in bf16 is), and every unmerge and merge of a `replicate_weights` swap
would round again, so a long-running base would drift. Unmerged, switching adapters is a flag
and the base stays bit-identical. The cost, a small matrix product pair per linear layer, is
mostly kernel launches, which CUDA graphs take away (src/serving/step_graphs.py).

Requests run concurrently: each is prepared on its own (weights unpacked and checked, prompt
encoded) and handed to one scheduler thread that alone runs the model, decoding every active
request in one batched step, each row with its own adapter (src/serving/scheduler.py,
src/serving/batch_step.py).

An adapter trained with QLoRA is served on the base loaded in 4-bit NF4 exactly as in
training, through the same bitsandbytes modules and peft layers: it computes what the trained
model computes in eval, exactly (a dequantized base runs other kernels, whose bf16 rounding
lands elsewhere), and the base takes a quarter of the memory.
"""

import asyncio
import contextvars
import functools
import hashlib
import os
import threading
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from src.adapters import WeightsStore, check_adapter_fits
from src.artifact import AdapterFiles
from src.base_model import BaseModel, keep_compiler_caches_out_of_tmp, resolve_base_model
from src.errors import UserInputError, raise_all
from src.fetch import public_url
from src.inputs import as_float, as_int
from src.log import Stopwatch, log
from src.modeling import (
    Placement,
    context_window,
    keep_4bit_weights_trainable,
    load_base_model,
    load_tokenizer,
    pick_placement,
    quiet_peft,
)
from src.prompt_format import (
    DEFAULT_PROMPT_TEMPLATE,
    TrainedSystemPrompt,
    choose_system_prompt,
    describe_system_prompt,
    encode_inference_prompt,
    is_preformatted,
)
from src.seeds import SEED_MAX, SEED_MIN
from src.serving.attach import attach_adapter
from src.serving.generation import MIN_REPETITION_PENALTY, GenerationStats, TextStream
from src.serving.model_thread import ModelThread
from src.serving.sampling import SamplingSettings, sampling_seed
from src.serving.scheduler import (
    END,
    READY,
    WAIT_FOR_ADAPTER_SLOT,
    WAIT_FOR_LOAD,
    Channel,
    Scheduler,
    Stream,
    bucket_of,
)
from src.serving.serving_plan import ServingPlan

MAX_LOADED_ADAPTERS = 4  # adapters kept in memory for `replicate_weights`, least recent dropped
DTYPE_VARIABLE = "PREDICT_DTYPE"
SERVING_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class ChatRequest:
    prompt: str
    system_prompt: str | None  # None: as the adapter was trained (choose_system_prompt)
    prompt_template: str
    settings: SamplingSettings
    stop_sequences: list[str]
    replicate_weights: str | None = None
    debug: bool = False


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter injected into the model, under the name `adapter_name(identity)`."""

    identity: str  # WeightsStore.identity of its source
    source: str  # as logs name it
    system_prompt: TrainedSystemPrompt | None  # what its training rows used, if recorded


@dataclass(frozen=True)
class PreparedRequest:
    """A request made ready on its own thread, before the scheduler runs it: its adapter
    unpacked and checked, its prompt encoded, its settings capped to the context window."""

    request: ChatRequest
    prompt_ids: list[int]
    settings: SamplingSettings
    adapter: str | None  # peft adapter name; None: the plain base
    identity: str | None  # of replicate_weights (pending in the store until it leaves)
    files: AdapterFiles | None  # replicate_weights' unpacked adapter
    source: str | None


class ChatModel:
    """One base model in memory, with any number of trained adapters on it, serving many
    requests at once through one scheduler thread (src/serving/scheduler.py)."""

    def __init__(self, weights: str | None) -> None:
        clock = Stopwatch()
        keep_compiler_caches_out_of_tmp()
        self.store = WeightsStore()
        # The setup weights are identified once: a later change or deletion of their file
        # does not change what requests without replicate_weights are served.
        setup_identity = self.store.identity(weights) if weights else None
        setup_adapter = self.store.unpack(weights, identity=setup_identity) if weights else None
        self.setup_name = adapter_name(setup_identity) if setup_identity else None
        self.base: BaseModel = resolve_base_model()
        self.placement: Placement = serving_placement()
        self.tokenizer = load_tokenizer(self.base.path)
        self.context_window = context_window(self.base.path)
        self.from_qlora = setup_adapter is not None and setup_adapter.peft_method == "qlora"
        # loaded on the thread that will decode with it (src/serving/model_thread.py)
        self.model_thread = ModelThread()
        self.model: PreTrainedModel | PeftModel = self.model_thread.run(
            lambda: load_inference_base(self.base.path, self.from_qlora, self.placement)
        )
        self.loaded: OrderedDict[str, LoadedAdapter] = OrderedDict()  # least recent first
        self.active: str | None = None  # peft's active adapter (prefills), None: plain base
        # Adapters in use by admitted streams (never evicted), and replicate_weights that
        # requests have unpacked and not yet left (their folders stay).
        self.in_use: Counter[str] = Counter()
        self.pending: Counter[str] = Counter()
        self.registry = threading.RLock()  # loaded, in_use, pending: request and scheduler threads
        self.loading: str | None = None  # the adapter being loaded beside the decode steps
        self.loading_for: PreparedRequest | None = None  # the request waiting for it
        # what failed to load, by the request waiting for it
        self.failed_loads: dict[int, tuple[PreparedRequest, BaseException]] = {}
        self.unpacking = threading.Lock()  # one download or unpack at a time
        if weights and setup_adapter and setup_identity:
            self.model_thread.run(lambda: self._activate(setup_identity, weights, setup_adapter))
        self.plan = ServingPlan.for_model(self.model, self.context_window)
        self.scheduler = Scheduler(
            self, self.plan.slots, self.plan.kv_budget_bytes, self.tokenizer.eos_token_id,
            adapter_slots=MAX_LOADED_ADAPTERS, model_thread=self.model_thread,
        )  # fmt: skip
        log(self.plan.describe())
        log(
            f"ready: base {self.base.public_name} on {self.placement.device} in "
            f"{str(self.placement.dtype).removeprefix('torch.')}, adapter "
            f"{'from ' + _short(weights) if weights else 'none'} (setup {clock.elapsed():.1f} s)"
        )

    def chat(self, request: ChatRequest, stats: GenerationStats | None = None) -> Iterator[str]:
        """Stream the answer to one request from a thread; `stats` is filled in as it goes."""
        prepared = self.prepare(request)
        channel = Channel()
        stream, answer = self._submit(prepared, channel, stats or GenerationStats())
        try:
            while True:
                piece, done = answer.take(channel.get())
                if piece:
                    yield piece
                if done:
                    return
        finally:
            stream.cancel()  # a stop sequence or a reader gone: the row leaves at the next step

    async def achat(
        self, request: ChatRequest, stats: GenerationStats | None = None
    ) -> AsyncIterator[str]:
        """The same from a coroutine (Cog's concurrent predictions): nothing here blocks the
        event loop; canceling the coroutine (a client gone) ends the stream."""
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()  # as asyncio.to_thread: Cog's log capture
        preparing = loop.run_in_executor(
            None, functools.partial(context.run, self.prepare, request)
        )
        try:
            prepared = await asyncio.shield(preparing)
        except asyncio.CancelledError:  # gone while it was prepared: what it holds goes back
            preparing.add_done_callback(self._release_if_prepared)
            raise
        channel = Channel(loop)
        stream, answer = self._submit(prepared, channel, stats or GenerationStats())
        try:
            while True:
                piece, done = answer.take(await channel.aget())
                if piece:
                    yield piece
                if done:
                    return
        finally:
            stream.cancel()

    def _release_if_prepared(self, preparing: asyncio.Future) -> None:
        if not preparing.cancelled() and preparing.exception() is None:
            self._release(preparing.result(), False)

    def first_token_logits(self, request: ChatRequest) -> torch.Tensor:
        """The logits (1, V) a request's first token is sampled from, computed as it is
        served (its adapter loaded and its prompt run by the scheduler): for the fidelity
        tests and benchmarks. The request's error is raised, as `chat` raises it."""
        request = replace(request, settings=replace(request.settings, max_new_tokens=1))
        prepared = self.prepare(request)
        channel = Channel()
        stream, answer = self._submit(prepared, channel, GenerationStats(), keep_logits=True)
        while not answer.take(channel.get())[1]:
            pass
        assert stream.first_logits is not None
        return stream.first_logits

    def prepare(self, request: ChatRequest) -> PreparedRequest:
        """Everything about a request that may fail or wait on a download, before the
        scheduler sees it: its adapter unpacked and checked against the base, its prompt."""
        adapter, identity, files, source, trained = self._request_adapter(request.replicate_weights)
        try:
            system = self._system_prompt(request, trained, adapter is not None)
            prompt_ids = encode_inference_prompt(
                self.tokenizer, request.prompt, system, request.prompt_template
            )
            settings = self._capped(request.settings, len(prompt_ids))
        except BaseException:
            self._leave_pending(identity, adapter)
            raise
        return PreparedRequest(request, prompt_ids, settings, adapter, identity, files, source)

    def _request_adapter(
        self, replicate_weights: str | None
    ) -> tuple[str | None, str | None, AdapterFiles | None, str | None, TrainedSystemPrompt | None]:
        """(adapter name, identity, unpacked files, source, the system prompt it was trained
        with) of a request's weights; the setup weights (always loaded) or the plain base
        when it names none."""
        if replicate_weights is None:
            with self.registry:
                record = self.loaded.get(self.setup_name) if self.setup_name else None
            return self.setup_name, None, None, None, record.system_prompt if record else None
        identity = self.store.identity(replicate_weights)
        name = adapter_name(identity)
        with self.registry:
            self.pending[identity] += 1  # its folder stays while this request needs it
            if (record := self.loaded.get(name)) is not None:  # warm: nothing to unpack again
                return name, identity, None, replicate_weights, record.system_prompt
        try:
            with self.unpacking:
                files = self.store.unpack(replicate_weights, "replicate_weights", identity)
            # its tensors checked on the model's thread (src/serving/model_thread.py)
            self.model_thread.run(lambda: self._check_base(files, replicate_weights))
        except BaseException:
            self._leave_pending(identity, name)
            raise
        return name, identity, files, replicate_weights, files.trained_system_prompt

    def _leave_pending(self, identity: str | None, name: str | None) -> None:
        if identity is None:
            return
        with self.registry:
            self.pending[identity] -= 1
            if self.pending[identity] <= 0:
                del self.pending[identity]
                if name not in self.loaded:
                    self.store.forget(identity)  # what is not loaded takes no room

    def _capped(self, settings: SamplingSettings, prompt_tokens: int) -> SamplingSettings:
        room = self.context_window - prompt_tokens
        if room < 1:
            raise UserInputError(
                f"the prompt is {prompt_tokens} tokens, which leaves no room in the model's "
                f"context window of {self.context_window} tokens"
            )
        if settings.max_new_tokens <= room:
            return settings
        log(
            f"max_new_tokens capped from {settings.max_new_tokens} to {room} "
            f"(context window {self.context_window}, prompt {prompt_tokens} tokens)"
        )
        return SamplingSettings(**{**settings.__dict__, "max_new_tokens": room})

    def _submit(
        self,
        prepared: PreparedRequest,
        channel: Channel,
        stats: GenerationStats,
        keep_logits: bool = False,
    ) -> tuple[Stream, "Answer"]:
        settings = prepared.settings
        stream = Stream(
            prompt_ids=prepared.prompt_ids,
            settings=settings,
            seed=sampling_seed(settings),
            adapter=prepared.adapter,
            bucket=bucket_of(
                len(prepared.prompt_ids) + settings.max_new_tokens, self.context_window
            ),
            channel=channel,
            admit=lambda: self._admit(prepared),
            release=lambda admitted: self._release(prepared, admitted),
            keep_first_logits=keep_logits,
        )
        answer = Answer(self, prepared, stats)
        if settings.max_new_tokens < 1:  # nothing to generate
            self._release(prepared, False)
            channel.put(END)
            return stream, answer
        return self.scheduler.submit(stream), answer

    # on the scheduler thread

    def _admit(self, prepared: PreparedRequest) -> str:
        """READY: the request's adapter is loaded, and pinned while it runs. Else wait:
        WAIT_FOR_LOAD while an adapter loads (started here if the request's is not loaded,
        room made by evicting one no stream uses), WAIT_FOR_ADAPTER_SLOT while every adapter
        the cache holds is in use (requests behind it may pass).

        Loading runs on a thread of its own, so the active rows keep decoding; no prompt
        runs meanwhile, since peft's forward of a prefill reads the layers peft is changing
        (the batched step reads only the adapters of its rows). A failed load fails the
        request that waits for it, with its error."""
        if self.loading is not None:
            return WAIT_FOR_LOAD
        name = prepared.adapter
        if name is None:
            return READY
        with self.registry:
            _, failure = self.failed_loads.pop(id(prepared), (None, None))
            if failure is not None:
                raise failure
            if name not in self.loaded:  # new, or evicted since the request was prepared
                if not self._room_for_one_more():
                    return WAIT_FOR_ADAPTER_SLOT
                self.loading, self.loading_for = name, prepared
                assert prepared.identity is not None
                self.pending[prepared.identity] += 1  # its folder stays while it loads
                loader = threading.Thread(
                    target=self._load_beside_the_steps, args=(prepared,), name="adapter-load"
                )
                loader.start()
                return WAIT_FOR_LOAD
            self.loaded.move_to_end(name)
            self.in_use[name] += 1
        return READY

    def _load_beside_the_steps(self, prepared: PreparedRequest) -> None:
        assert prepared.identity is not None and prepared.source is not None
        try:
            # the folder stayed (the request is pending): opening it again is quick
            files = prepared.files or self.store.unpack(
                prepared.source, "replicate_weights", prepared.identity
            )
            self._add_adapter(prepared.identity, prepared.source, files)
        except BaseException as error:
            with self.registry:
                if self.loading_for is prepared:  # still waiting for it (not gone meanwhile)
                    self.failed_loads[id(prepared)] = (prepared, error)  # (alive: its id)
        finally:
            with self.registry:
                self.loading = self.loading_for = None
            self._leave_pending(prepared.identity, prepared.adapter)
            self.scheduler.wake()

    def _release(self, prepared: PreparedRequest, admitted: bool) -> None:
        with self.registry:
            self.failed_loads.pop(id(prepared), None)
            if self.loading_for is prepared:  # gone while its adapter loads
                self.loading_for = None
            if admitted and prepared.adapter is not None:
                self.in_use[prepared.adapter] -= 1
                if self.in_use[prepared.adapter] <= 0:
                    del self.in_use[prepared.adapter]
        self._leave_pending(prepared.identity, prepared.adapter)

    @contextmanager
    def activate_for_prefill(self, adapter: str | None) -> Iterator[None]:
        """peft's active adapter for a prompt's prefill (the decode steps apply each row's
        own adapter, src/serving/batch_step.py)."""
        with self.registry:
            self._switch(adapter)
        with self._adapter_context():
            yield

    def _system_prompt(
        self, request: ChatRequest, trained: TrainedSystemPrompt | None, has_adapter: bool
    ) -> str | None:
        """The request's system prompt, or the one its adapter was trained with; the log
        says which and why."""
        system, why = choose_system_prompt(request.system_prompt, trained, has_adapter)
        if request.prompt_template == DEFAULT_PROMPT_TEMPLATE and is_preformatted(request.prompt):
            if system:
                log(
                    "the prompt is in Llama-2 chat form and is used as is: system_prompt is "
                    "not added (put a <<SYS>> block in its first [INST] turn instead)"
                )
            return None
        log(f"system prompt: {describe_system_prompt(system)}, {why}")
        return system

    def _switch(self, name: str | None) -> None:
        """Make a loaded adapter (None: the plain base) the active one."""
        if name == self.active:
            return
        if name is None:
            self._deactivate()
            return
        self.loaded.move_to_end(name)
        assert isinstance(self.model, PeftModel)
        self.model.set_adapter(name)
        self.active = name

    def _activate(self, identity: str, source: str, adapter: AdapterFiles) -> None:
        self._check_base(adapter, source)
        self._deactivate()
        name = self._add_adapter(identity, source, adapter)
        self._evict_beyond_the_cache(keep=name)
        self._switch(name)

    def _add_adapter(self, identity: str, source: str, adapter: AdapterFiles) -> str:
        """Load an adapter beside the others (all or nothing); returns its name."""
        started = time.perf_counter()
        name = adapter_name(identity)
        self._load_adapter(name, adapter)
        with self.registry:
            self.loaded[name] = LoadedAdapter(
                identity, _short(source), adapter.trained_system_prompt
            )
        log(f"adapter {_short(source)} loaded ({time.perf_counter() - started:.2f} s)")
        return name

    def _evictable(self, keep: str | None = None) -> list[str]:
        """Loaded adapters that may go, least recently used first: not the setup weights,
        not one an admitted stream uses, not `keep` (about to serve)."""
        return [
            name
            for name in self.loaded
            if name not in (self.setup_name, keep) and self.in_use[name] <= 0
        ]

    def _room_for_one_more(self) -> bool:
        """Evict what must go for one more adapter; False if all the cache holds are in use."""
        evictable = self._evictable()
        while len(self.loaded) >= MAX_LOADED_ADAPTERS and evictable:
            self._evict(evictable.pop(0))
        return len(self.loaded) < MAX_LOADED_ADAPTERS

    def _evict_beyond_the_cache(self, keep: str) -> None:
        """Drop the least recently used adapters beyond MAX_LOADED_ADAPTERS."""
        evictable = self._evictable(keep)
        while len(self.loaded) > MAX_LOADED_ADAPTERS and evictable:
            self._evict(evictable.pop(0))

    def _evict(self, name: str) -> None:
        """An adapter out of the model, and out of the store's folder unless a request
        waiting to run has it unpacked."""
        evicted = self.loaded.pop(name)
        if self.active == name:
            self._deactivate()
        with warnings.catch_warnings():  # peft notes that the active one goes
            warnings.filterwarnings("ignore", message=".*was active which is now deleted")
            assert isinstance(self.model, PeftModel)
            self.model.delete_adapter(name)
        if hasattr(self, "scheduler"):  # (not yet during setup)
            self.scheduler.forget_adapter(name)
        if self.pending[evicted.identity] <= 0:
            self.store.forget(evicted.identity)

    def _load_adapter(self, name: str, adapter: AdapterFiles) -> None:
        trained_on_4bit = adapter.peft_method == "qlora"
        if trained_on_4bit != self.from_qlora:
            log(
                f"note: an adapter trained on a {'4-bit' if trained_on_4bit else 'full-precision'}"
                f" base, served on this server's {'4-bit' if self.from_qlora else 'full-precision'}"
                f" one (set up with {'QLoRA' if self.from_qlora else 'LoRA'} weights): outputs "
                f"may differ slightly from the trained model's"
            )
        try:
            with quiet_peft():
                self._attach(name, adapter)
        except (ValueError, KeyError, RuntimeError) as error:
            raise UserInputError(
                f"weights: not a valid adapter for this base model: {error}"
            ) from error

    def _attach(self, name: str, adapter: AdapterFiles) -> None:
        self.model = attach_adapter(self.model, name, str(adapter.folder))

    def _deactivate(self) -> None:
        self.active = None

    def _adapter_context(self):
        """Adapters stay injected while unmerged: switch them off to serve the plain base."""
        if self.active is None and isinstance(self.model, PeftModel):
            return self.model.disable_adapter()
        return nullcontext()

    def _check_base(self, adapter: AdapterFiles, source: str) -> None:
        base = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        check_adapter_fits(adapter, self.base, base, f"weights {_short(source)}")


class Answer:
    """The reading end of a stream: token ids in, text pieces out (whole characters, stop
    sequences never emitted), `stats` filled in; the scheduler's error raised here."""

    def __init__(self, chat: ChatModel, prepared: PreparedRequest, stats: GenerationStats):
        self.chat, self.prepared, self.stats = chat, prepared, stats
        self.text = TextStream(chat.tokenizer, prepared.request.stop_sequences)
        self.started = time.perf_counter()
        stats.input_tokens = len(prepared.prompt_ids)

    def take(self, item: object) -> tuple[str, bool]:
        """(text to give out now, whether the answer is over) for one item of the channel."""
        if isinstance(item, BaseException):
            raise item
        if item is END:
            self._debug()
            return self.text.flush(), True
        stats = self.stats
        stats.output_tokens += 1
        stats.total_time = time.perf_counter() - self.started
        if stats.output_tokens == 1:
            stats.time_to_first_token = stats.total_time
        piece = self.text.push(item)  # type: ignore[arg-type]
        if self.text.stopped:
            self._debug()
            return piece, True
        return piece, False

    def _debug(self) -> None:
        if not self.prepared.request.debug:
            return
        stats = self.stats
        log(
            f"debug: {stats.input_tokens} prompt tokens, {stats.output_tokens} new tokens, "
            f"first token after {stats.time_to_first_token:.3f} s, "
            f"{stats.tokens_per_second:.1f} tokens/s, adapter {self.prepared.adapter or 'none'}, "
            f"{self.prepared.settings}"
        )


def serving_placement() -> Placement:
    """bf16 on a GPU, fp32 on a CPU; PREDICT_DTYPE (bfloat16 or float32) overrides either."""
    placement = pick_placement()
    name = os.environ.get(DTYPE_VARIABLE)
    if not name:
        return placement
    if name not in SERVING_DTYPES:
        raise UserInputError(
            f"{DTYPE_VARIABLE} must be one of {', '.join(SERVING_DTYPES)}, got {name!r}"
        )
    return Placement(placement.device, SERVING_DTYPES[name])


def load_inference_base(model_dir: Path, from_qlora: bool, placement: Placement) -> PreTrainedModel:
    """The base in the placement's dtype; for QLoRA, in 4-bit NF4 exactly as in training.
    Serving needs no packed rows: transformers' own sdpa attention, which masks static caches."""
    model = load_base_model(
        model_dir, quantize_4bit=from_qlora, placement=placement, attention="sdpa"
    )
    if from_qlora:
        keep_4bit_weights_trainable(model)  # the training kernels, not a CPU inference repack
    model.config.use_cache = True
    return model.eval()


def adapter_name(identity: str) -> str:
    """The peft adapter name of a source's identity (WeightsStore.identity)."""
    return "w" + hashlib.sha256(identity.encode()).hexdigest()[:12]


def _short(source: str | None) -> str:
    if source is None:
        return "none"
    return "data: URI" if source.startswith("data:") else public_url(source)


def build_chat_request(
    *,
    prompt: str,
    system_prompt: str | None,
    prompt_template: str,
    max_new_tokens: Any,
    min_new_tokens: Any,
    temperature: Any,
    top_p: Any,
    top_k: Any,
    repetition_penalty: Any,
    stop_sequences: str | None,
    seed: Any,
    replicate_weights: str | None,
    debug: bool,
) -> ChatRequest:
    """Coerce and check predict.py's inputs; raise one UserInputError naming every problem."""
    problems: list[str] = []
    settings = SamplingSettings(
        max_new_tokens=as_int("max_new_tokens", max_new_tokens, problems),
        min_new_tokens=as_int("min_new_tokens", min_new_tokens, problems),
        temperature=as_float("temperature", temperature, problems),
        top_p=as_float("top_p", top_p, problems),
        top_k=as_int("top_k", top_k, problems),
        repetition_penalty=as_float("repetition_penalty", repetition_penalty, problems),
        seed=None if seed is None else as_int("seed", seed, problems),
    )
    if settings.seed is not None and not SEED_MIN <= settings.seed <= SEED_MAX:
        problems.append(f"seed must be a signed 64-bit integer, got {settings.seed}")
    penalty = settings.repetition_penalty
    if isinstance(penalty, float) and 0 < penalty < MIN_REPETITION_PENALTY:
        problems.append(
            f"repetition_penalty must be 0 or 1 (off) or at least {MIN_REPETITION_PENALTY}, "
            f"got {penalty}: dividing logits by less overflows them"
        )
    if not prompt.strip():
        problems.append("prompt is empty")
    if "{prompt}" not in prompt_template:
        problems.append(f"prompt_template must contain {{prompt}}, got {prompt_template!r}")
    raise_all(problems, "Invalid inputs:")
    return ChatRequest(
        prompt=prompt,
        system_prompt=system_prompt,
        prompt_template=prompt_template,
        settings=settings,
        stop_sequences=[s for s in (stop_sequences or "").split(",") if s],
        replicate_weights=replicate_weights or None,
        debug=debug,
    )
