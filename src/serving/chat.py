"""The chat model behind predict.py: base model, trained adapters, prompt, streamed answer.

Adapters are served unmerged, as they were trained: the base weights are never written, and
the LoRA branch runs in fp32 beside them. In bf16 (the serving precision on a GPU) merging
would round much of a delta away (base weights of std 0.02 against a delta of rms 2e-4: on an
H200 the merged 7B model's logits were 2.3 times further from the trained model in fp32 than
the trained model in bf16 is), and every unmerge and merge of a `replicate_weights` swap
would round again, so a long-running base would drift. Unmerged, switching adapters is a flag
and the base stays bit-identical. The cost, a small matrix product pair per linear layer, is
mostly kernel launches, which CUDA graphs take away (src/serving/decoding.py).

An adapter trained with QLoRA is served on the base loaded in 4-bit NF4 exactly as in
training, through the same bitsandbytes modules and peft layers: it computes what the trained
model computes in eval, exactly (a dequantized base runs other kernels, whose bf16 rounding
lands elsewhere), and the base takes a quarter of the memory.
"""

import hashlib
import os
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
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
from src.serving.decoding import Decoder, EagerDecoder, GraphedDecoder
from src.serving.generation import (
    MIN_REPETITION_PENALTY,
    GenerationStats,
    SamplingSettings,
    stream_text,
)

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


class ChatModel:
    """One base model in memory, with any number of trained adapters swapped on it."""

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
        self.model: PreTrainedModel | PeftModel = load_inference_base(
            self.base.path, self.from_qlora, self.placement
        )
        self.decoder: Decoder = make_decoder(self.model, self.context_window)
        self.loaded: OrderedDict[str, LoadedAdapter] = OrderedDict()  # least recent first
        self.active: str | None = None  # the adapter in use, None for the plain base
        if weights and setup_adapter and setup_identity:
            self._activate(setup_identity, weights, setup_adapter)
        log(
            f"ready: base {self.base.public_name} on {self.placement.device} in "
            f"{str(self.placement.dtype).removeprefix('torch.')}, adapter "
            f"{'from ' + _short(weights) if weights else 'none'} (setup {clock.elapsed():.1f} s)"
        )

    def chat(self, request: ChatRequest, stats: GenerationStats | None = None) -> Iterator[str]:
        """Stream the answer to one request; `stats` is filled in as it goes."""
        stats = stats or GenerationStats()
        self.use_weights(request.replicate_weights)
        system = self._system_prompt(request)
        prompt_ids = encode_inference_prompt(
            self.tokenizer, request.prompt, system, request.prompt_template
        )
        room = self.context_window - len(prompt_ids)
        if room < 1:
            raise UserInputError(
                f"the prompt is {len(prompt_ids)} tokens, which leaves no room in the model's "
                f"context window of {self.context_window} tokens"
            )
        settings = request.settings
        if settings.max_new_tokens > room:
            log(
                f"max_new_tokens capped from {settings.max_new_tokens} to {room} "
                f"(context window {self.context_window}, prompt {len(prompt_ids)} tokens)"
            )
            settings = SamplingSettings(**{**settings.__dict__, "max_new_tokens": room})
        with self._adapter_context():
            yield from stream_text(
                self.decoder, self.tokenizer, prompt_ids, settings, request.stop_sequences, stats
            )
        if request.debug:
            log(
                f"debug: {stats.input_tokens} prompt tokens, {stats.output_tokens} new tokens, "
                f"first token after {stats.time_to_first_token:.3f} s, "
                f"{stats.tokens_per_second:.1f} tokens/s, adapter {self.active or 'none'}, "
                f"{settings}"
            )

    def _system_prompt(self, request: ChatRequest) -> str | None:
        """The request's system prompt, or the one the active adapter was trained with; the
        log says which and why."""
        adapter = self.loaded.get(self.active) if self.active else None
        system, why = choose_system_prompt(
            request.system_prompt, adapter.system_prompt if adapter else None, adapter is not None
        )
        if request.prompt_template == DEFAULT_PROMPT_TEMPLATE and is_preformatted(request.prompt):
            if system:
                log(
                    "the prompt is in Llama-2 chat form and is used as is: system_prompt is "
                    "not added (put a <<SYS>> block in its first [INST] turn instead)"
                )
            return None
        log(f"system prompt: {describe_system_prompt(system)}, {why}")
        return system

    def use_weights(self, replicate_weights: str | None) -> None:
        """Make the request's adapter the active one: `replicate_weights`, else the setup
        weights, else none (the plain base). An adapter is named by its source's identity
        (WeightsStore.identity), so a file replaced at the same path is loaded anew."""
        if replicate_weights is None:
            self._switch(self.setup_name)
            return
        identity = self.store.identity(replicate_weights)
        if adapter_name(identity) in self.loaded:
            self._switch(adapter_name(identity))
            return
        try:
            adapter = self.store.unpack(replicate_weights, "replicate_weights", identity)
            self._activate(identity, replicate_weights, adapter)
        except BaseException:
            self.store.forget(identity)  # what failed to load takes no room
            raise

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
        self._use_decoder()

    def _activate(self, identity: str, source: str, adapter: AdapterFiles) -> None:
        started = time.perf_counter()
        name = adapter_name(identity)
        self._check_base(adapter, source)
        self._deactivate()
        self._load_adapter(name, adapter)
        self.loaded[name] = LoadedAdapter(identity, _short(source), adapter.trained_system_prompt)
        self._evict_beyond_the_cache(keep=name)
        self._switch(name)
        log(f"adapter {_short(source)} active ({time.perf_counter() - started:.2f} s)")

    def _evict_beyond_the_cache(self, keep: str) -> None:
        """Drop the least recently used adapters beyond MAX_LOADED_ADAPTERS, from the model
        and from the store's folder; never the setup weights, nor `keep` (about to serve)."""
        evictable = [name for name in self.loaded if name not in (self.setup_name, keep)]
        while len(self.loaded) > MAX_LOADED_ADAPTERS and evictable:
            oldest = evictable.pop(0)
            evicted = self.loaded.pop(oldest)
            with warnings.catch_warnings():  # peft notes that the active one goes: it is next
                warnings.filterwarnings("ignore", message=".*was active which is now deleted")
                assert isinstance(self.model, PeftModel)
                self.model.delete_adapter(oldest)
            if isinstance(self.decoder, GraphedDecoder):
                self.decoder.forget(oldest)
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
        self._use_decoder()

    def _use_decoder(self) -> None:
        if isinstance(self.decoder, GraphedDecoder):
            self.decoder.use(self.model, self.active or "base")
        else:
            self.decoder = EagerDecoder(self.model)

    def _adapter_context(self):
        """Adapters stay injected while unmerged: switch them off to serve the plain base."""
        if self.active is None and isinstance(self.model, PeftModel):
            return self.model.disable_adapter()
        return nullcontext()

    def _check_base(self, adapter: AdapterFiles, source: str) -> None:
        base = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        check_adapter_fits(adapter, self.base, base, f"weights {_short(source)}")


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


def make_decoder(model: torch.nn.Module, context: int) -> Decoder:
    """CUDA graphs over static caches on a GPU; the dynamic cache (as `generate`) on a CPU."""
    if next(model.parameters()).device.type == "cuda":
        return GraphedDecoder(model, context)
    return EagerDecoder(model)


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
