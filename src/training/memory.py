"""GPU memory plan of a training: tokens per forward pass and where activation checkpointing
is needed, decided before the model loads from the card's memory and a measured model of what
a forward pass keeps for its backward pass.

A micro-batch is its rows laid end to end, and segments never attend to each other, so a
micro-batch can run as several forward passes of whole segments with the same gradient
(src/training/batching.forward_groups). The plan sets how many tokens one pass may hold:
  * without checkpointing, every decoder layer keeps about 194 KB per token (Llama-2-7B,
    bf16, the fused LoRA forward; 310 KB through peft's): about 6.2 MB per token for the
    model, so an A40 holds about 4,600 tokens a pass (2,900 through peft's forward), and
    rows up to the 4,096-token context train without checkpointing;
  * with (non-reentrant) checkpointing, a layer keeps only its input (8 KB per token in bf16)
    and one layer at a time is recomputed in the backward pass: 0.5 MB per token.
Checkpointing repeats the forward pass (a third more compute), so it is used only for the
passes that cannot fit without it: a segment longer than what fits without it runs alone,
checkpointed.

The per-layer costs were measured with torch.autograd.graph.saved_tensors_hooks on decoder
layers of the 7B shape (tests/training/test_memory.py measures them again and checks these
figures), and, before the fused forward and loss, on an H200 (docs/benchmarks.md): LoRA
9.4 MB per token without checkpointing, 0.68 MB with.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from src.errors import UserInputError
from src.modeling import Placement, lora_parameters
from src.training.fused_lora import fused_lora_enabled
from src.training.fused_loss import CHUNK as LOSS_CHUNK
from src.training.fused_loss import fused_loss_enabled

GIB = 2**30
BUDGET_VARIABLE = "TRAIN_GPU_MEMORY_GIB"  # hold a larger card to a smaller one's budget


@dataclass(frozen=True)
class LayerCost:
    """Bytes a decoder layer keeps per token for its backward pass, in bf16 with LoRA on all
    linear layers and dropout: per_hidden * hidden_size + per_mlp * intermediate_size +
    per_rank * rank + constant. Measured by tests/training/test_memory.py."""

    per_hidden: float
    per_mlp: float
    per_rank: float
    constant: float = 136.0  # norms' statistics, positions

    def bytes(self, hidden: int, mlp: int, rank: int) -> float:
        return self.per_hidden * hidden + self.per_mlp * mlp + self.per_rank * rank + self.constant


# The fused LoRA forward (src/training/fused_lora.py, the default): RMSNorm inputs in fp32
# (transformers' norm upcasts), each projection's input once per group of projections that
# read it (q/k/v, gate/up) in bf16 with its dropout mask in bool; q, k, v and the attention
# output in bf16; the MLP's gate, up and activation in bf16; each group's rank-wide middle
# in bf16. Llama-2-7B: 193.5 KB.
FUSED_LAYER = LayerCost(per_hidden=23.0, per_mlp=9.0, per_rank=14.0)
# peft's own forward (TRAIN_FUSED_LORA=0): every LoRA input copied to fp32 and kept with its
# own dropout mask (CUDA keeps a mask in 1 byte a value), the rank-wide middles in fp32.
# Llama-2-7B: 309.9 KB.
PEFT_LAYER = LayerCost(per_hidden=46.0, per_mlp=11.0, per_rank=28.0, constant=160.0)
# A forward pass without gradients (validation) holds one layer's intermediates at a time.
INFERENCE_BYTES_PER_HIDDEN = 64.0
INFERENCE_BYTES_PER_MLP = 8.0
# The loss (src/training/fused_loss.py) keeps the gradient of each supervised position's
# hidden state (bf16) and nothing of the vocabulary; the final norm and the selection of
# supervised positions about 4.5 bytes x hidden_size more.
HEAD_BYTES_PER_HIDDEN = 2.0 + 4.5
# Through autograd's cross-entropy instead (TRAIN_FUSED_LOSS=0): its fp32 log-softmax, kept
# for every supervised position (128 KB a token for a 32,000-word vocabulary).
UNFUSED_LOSS_BYTES_PER_VOCAB = 4.0
# Transients: one slice of the vocabulary projection (logits in bf16 and fp32, the softmax
# cast back to bf16: 8 bytes a logit) and the allocator's fragmentation; then what the plan
# leaves free, in case.
# What the allocator reserves beyond what is allocated, at the peak (H200, docs/benchmarks.md):
# up to 3% for LoRA, up to 20% for QLoRA (bitsandbytes' dequantized weights come and go).
ALLOCATOR_SHARE = {False: 0.08, True: 0.20}
HEADROOM = GIB
PROCESS_GROUP_HEADROOM = GIB  # NCCL's buffers, some allocated at the first collective
GATHERED_LAYERS = 2  # under FSDP2: the layer computing and the next one, prefetched
MAX_TOKENS_PER_FORWARD = 32_768  # beyond this a pass is no faster per token
CPU_FORWARD_TOKENS = 1024  # on a CPU, passes of about a thousand tokens run fastest


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    mlp: int
    layers: int
    vocab: int
    parameters: int  # of the base model
    lora_parameters_per_rank: int  # of an adapter on every linear layer (modeling)
    context_window: int = 4096
    tied_embeddings: bool = False
    kv_width: int | None = None  # keys' (and values') width: less than hidden with GQA

    @property
    def kv(self) -> int:
        return self.kv_width or self.hidden

    @property
    def layer_parameters(self) -> int:
        """Of one decoder layer (the base's parameters but its embeddings and final norm)."""
        return (self.parameters - self.embedding_parameters - self.hidden) // self.layers

    @property
    def embedding_parameters(self) -> int:
        """The input embeddings and, untied, the output head."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @classmethod
    def of(cls, config: dict) -> "ModelShape":
        hidden, mlp = config["hidden_size"], config["intermediate_size"]
        heads = config["num_attention_heads"]
        kv = hidden * config.get("num_key_value_heads", heads) // heads
        layers, vocab = config["num_hidden_layers"], config["vocab_size"]
        per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * mlp + 2 * hidden
        embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
        parameters = layers * per_layer + embeddings + hidden
        context = config.get("max_position_embeddings", 4096)
        per_rank = lora_parameters(config, rank=1)
        tied = bool(config.get("tie_word_embeddings"))
        return cls(hidden, mlp, layers, vocab, parameters, per_rank, context, tied, kv)


@dataclass(frozen=True)
class MemoryModel:
    """What a training of one model, method and rank needs on the device, in bytes."""

    shape: ModelShape
    quantized: bool
    lora_rank: int
    fused_lora: bool = True  # the training's LoRA forward (src/training/fused_lora.py)
    fused_loss: bool = True  # the training's loss (src/training/fused_loss.py)
    shards: int = 1  # the processes the base is sharded over (FSDP2); 1: the whole base

    @property
    def weights(self) -> int:
        """The base's bytes on one device: all of it, or under FSDP2 its share of every
        decoder layer, the layers gathered at a time and what stays whole (see `sharded`)."""
        if self.shards > 1:
            return self.sharded_weights
        shape = self.shape
        linear = shape.parameters - shape.vocab * shape.hidden * 2 - shape.hidden
        if not self.quantized:
            return 2 * shape.parameters  # bf16
        # NF4: half a byte per weight, one 8-bit scale per 64 (double quantisation), their
        # own fp32 scales, some slack; embeddings, norms and head stay in bf16.
        return int(linear * 0.53) + 2 * (shape.parameters - linear)

    @property
    def sharded_weights(self) -> int:
        """bf16 (4-bit bases are never sharded: src/training/parallelism.py). Each rank keeps
        1/shards of the decoder layers; FSDP2 gathers a layer whole for its forward and
        backward and fetches the next one meanwhile (GATHERED_LAYERS); the root's
        embeddings and norm stay gathered between forward and backward (FSDP2's root is not
        resharded after its forward); the output head is not sharded, as the loss reads its
        weight directly, nor input embeddings tied to it (src/training/sharding.py)."""
        shape = self.shape
        layers = shape.layers * shape.layer_parameters
        embeddings = shape.vocab * shape.hidden
        root = shape.hidden + (0 if shape.tied_embeddings else embeddings)
        head = embeddings  # the output head, or the input embeddings tied to it: whole
        stored = -(-(layers + root) // self.shards)
        gathered = GATHERED_LAYERS * shape.layer_parameters + root
        return 2 * (stored + gathered + head)

    @property
    def lora_parameters(self) -> int:
        return self.shape.lora_parameters_per_rank * self.lora_rank

    @property
    def trainable_state(self) -> int:
        """LoRA weights, gradients and AdamW's two moments, all fp32."""
        return 16 * self.lora_parameters

    @property
    def fixed(self) -> int:
        return self.weights + self.trainable_state

    @property
    def layer_bytes_per_token(self) -> float:
        cost = FUSED_LAYER if self.fused_lora else PEFT_LAYER
        return cost.bytes(self.shape.hidden, self.shape.mlp, self.lora_rank)

    @property
    def head_bytes_per_token(self) -> float:
        kept = HEAD_BYTES_PER_HIDDEN * self.shape.hidden
        if not self.fused_loss:
            kept += UNFUSED_LOSS_BYTES_PER_VOCAB * self.shape.vocab
        return kept

    def bytes_per_token(self, checkpointing: bool) -> float:
        """Kept per token of a pass, every position supervised (text rows: the worst case)."""
        if checkpointing:
            kept = 2 * self.shape.hidden * self.shape.layers + self.layer_bytes_per_token
        else:
            kept = self.layer_bytes_per_token * self.shape.layers
        return kept + self.head_bytes_per_token

    @property
    def context_window(self) -> int:
        return self.shape.context_window

    @property
    def inference_bytes_per_token(self) -> float:
        shape = self.shape
        per_token = INFERENCE_BYTES_PER_HIDDEN * shape.hidden + INFERENCE_BYTES_PER_MLP * shape.mlp
        kv_cache = 2 * 2 * shape.kv * shape.layers  # keys and values, bf16 (generation)
        return per_token + kv_cache

    @property
    def allocator_share(self) -> float:
        return ALLOCATOR_SHARE[self.quantized]

    @property
    def transient(self) -> int:
        return int(8 * LOSS_CHUNK * self.shape.vocab)

    def peak(self, tokens: int, checkpointing: bool) -> int:
        activations = tokens * self.bytes_per_token(checkpointing) + self.transient
        return int((self.fixed + activations) * (1 + self.allocator_share))

    def most_tokens(self, budget: int, per_token: float) -> int:
        """The most tokens one pass may hold within `budget` (0: not even the model fits)."""
        room = (budget - HEADROOM) / (1 + self.allocator_share) - self.fixed - self.transient
        return max(0, min(MAX_TOKENS_PER_FORWARD, int(room / per_token)))


@dataclass(frozen=True)
class ForwardPlan:
    """How the training loop cuts micro-batches into forward passes."""

    tokens: int | None  # tokens per pass without checkpointing; None: the whole micro-batch
    checkpointed_tokens: int | None = None  # a longer segment runs alone, checkpointed
    validation_tokens: int | None = None  # tokens per validation pass (no gradients)
    estimated_peak: int | None = None
    budget: int | None = None
    # Every rank runs as many passes as every other (a rank short of them runs passes of
    # zero weight): under FSDP2 each pass gathers weights from all the ranks.
    lockstep: bool = False

    def checkpoint(self, tokens: int) -> bool:
        """A pass over the limit (a lone long segment) is checkpointed where memory demands
        it; on a CPU the limit is about speed, and such a pass simply runs whole."""
        return (
            self.checkpointed_tokens is not None
            and self.tokens is not None
            and tokens > self.tokens
        )

    def describe(self) -> str:
        if self.tokens is None:
            return "memory plan: whole micro-batches per forward pass"
        if self.budget is None:
            return f"forward passes of up to {self.tokens:,} tokens (the fastest size on a CPU)"
        checkpointing = (
            f"activation checkpointing for segments longer than {self.tokens:,} tokens (up "
            f"to {self.checkpointed_tokens:,})"
            if self.checkpointed_tokens
            else "activation checkpointing off"
        )
        return (
            f"memory plan: up to {self.tokens:,} tokens per forward pass, {checkpointing}, "
            f"estimated peak {self.estimated_peak / GIB:.1f} of {self.budget / GIB:.1f} GiB"
        )


def plan_forwards(
    model: MemoryModel, budget: int, longest_segment: int, longest_validation: int = 0
) -> ForwardPlan:
    """The plan for one device; raises UserInputError for what cannot fit at all.

    `longest_segment` is the longest training example (or wrapped fragment): a pass never
    splits one. Passes without gradients (validation rows, a validation_prompt answer with
    its KV cache) keep no activations; their longest, `longest_validation`, only has to fit.
    """
    fits = model.most_tokens(budget, model.bytes_per_token(checkpointing=False))
    validation = model.most_tokens(budget, model.inference_bytes_per_token)
    if longest_validation > validation:
        raise _no_room_to_validate(model, budget, longest_validation)
    if longest_segment <= fits:
        peak = model.peak(fits, checkpointing=False)
        return ForwardPlan(fits, None, validation, peak, budget)
    fits_checkpointed = model.most_tokens(budget, model.bytes_per_token(checkpointing=True))
    if longest_segment > fits_checkpointed:
        raise _too_large(model, budget, longest_segment)
    peak = max(model.peak(fits, False), model.peak(longest_segment, True))
    return ForwardPlan(fits, fits_checkpointed, validation, peak, budget)


def _no_room_to_validate(model: MemoryModel, budget: int, tokens: int) -> UserInputError:
    if model.fixed + HEADROOM > budget:
        return _too_large(model, budget, tokens)
    per_token = model.inference_bytes_per_token
    needed = (model.fixed + model.transient + tokens * per_token) * (1 + model.allocator_share)
    needed += HEADROOM
    return UserInputError(
        f"a forward pass of {tokens:,} tokens without gradients (validation, a "
        f"validation_prompt answer) needs about {needed / GIB:.1f} GiB with the model, more "
        f"than the {budget / GIB:.1f} GiB available: lower lora_rank"
    )


def _too_large(model: MemoryModel, budget: int, longest: int) -> UserInputError:
    available = f"{budget / GIB:.1f} GiB available"
    if model.fixed + HEADROOM > budget:
        lora = model.trainable_state / GIB
        return UserInputError(
            f"the base model's weights ({model.weights / GIB:.1f} GiB) and the LoRA weights "
            f"with their optimizer state ({lora:.1f} GiB) need {model.fixed / GIB:.1f} GiB "
            f"before any activation, more than the {available}: lower lora_rank"
            + ("" if model.quantized else ", or set peft_method to qlora")
        )
    needed = (model.peak(longest, checkpointing=True) + HEADROOM) / GIB
    return UserInputError(
        f"a training row of {longest:,} tokens needs about {needed:.1f} GiB even with "
        f"activation checkpointing, more than the {available}: lower chunk_size or shorten "
        f"the longest rows" + ("" if model.quantized else ", or set peft_method to qlora")
    )


def memory_budget(free_bytes: int) -> int:
    """The device's free memory, or less where the operator set TRAIN_GPU_MEMORY_GIB."""
    configured = os.environ.get(BUDGET_VARIABLE)
    if not configured:
        return free_bytes
    try:
        budget = float(configured) * GIB
    except ValueError as error:
        raise UserInputError(
            f"{BUDGET_VARIABLE} must be a number of GiB, got {configured!r}"
        ) from error
    if budget <= 0:
        raise UserInputError(f"{BUDGET_VARIABLE} must be positive, got {configured!r}")
    return int(min(budget, free_bytes))


def memory_model_for(model_config: dict, quantized: bool, lora_rank: int) -> MemoryModel:
    """The memory model of the training as the environment configures it (TRAIN_FUSED_LORA,
    TRAIN_FUSED_LOSS)."""
    return MemoryModel(
        ModelShape.of(model_config), quantized, lora_rank, fused_lora_enabled(),
        fused_loss_enabled(),
    )  # fmt: skip


def plan_for_device(
    placement: Placement,
    model_config: dict,
    quantized: bool,
    lora_rank: int,
    longest: int,
    longest_validation: int = 0,
    processes: int = 1,
) -> ForwardPlan:
    """The plan on this process's device: its free memory on a GPU (less what a process group
    still allocates); on a CPU, passes of CPU_FORWARD_TOKENS (speed, not memory, decides)."""
    if placement.device.type != "cuda":
        return CPU_PLAN
    model = memory_model_for(model_config, quantized, lora_rank)
    budget = device_budget(placement, processes)
    return plan_forwards(model, budget, longest, longest_validation)


CPU_PLAN = ForwardPlan(CPU_FORWARD_TOKENS, validation_tokens=CPU_FORWARD_TOKENS)


def device_budget(placement: Placement, processes: int) -> int:
    """What a training may use of this process's GPU: its free memory (or the operator's
    budget), less what a process group still allocates."""
    free, _ = torch.cuda.mem_get_info(placement.device)
    return memory_budget(free) - (PROCESS_GROUP_HEADROOM if processes > 1 else 0)


def out_of_memory(plan: ForwardPlan, error: BaseException) -> UserInputError:
    """What to tell a user whose training still ran out of GPU memory."""
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    return UserInputError(
        f"the GPU ran out of memory ({first_line}); {plan.describe()}. Set {BUDGET_VARIABLE} "
        f"below the card's memory so that the plan leaves more room, or lower lora_rank"
    )


HOST_MEMORY_VARIABLE = "TRAIN_HOST_MEMORY_GIB"  # hold the data stage to less host memory


def available_host_memory() -> int:
    """Host memory this process may still use: what Linux reports available, capped by the
    container's cgroup limit (a Cog container sees the host's memory in /proc/meminfo), or
    by TRAIN_HOST_MEMORY_GIB."""
    candidates = []
    configured = os.environ.get(HOST_MEMORY_VARIABLE)
    if configured:
        try:
            candidates.append(int(float(configured) * GIB))
        except ValueError:
            raise UserInputError(
                f"{HOST_MEMORY_VARIABLE} must be a number of GiB, got {configured!r}"
            ) from None
    candidates += [n for n in (_meminfo_available(), _cgroup_room()) if n is not None]
    return min(candidates) if candidates else 2**62


def _meminfo_available() -> int | None:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def _cgroup_room(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The cgroup's memory limit minus what it holds, None without a limit (cgroup v2, then
    v1). The page cache it can drop (inactive files: the downloaded data, the model's
    shards) is not held, as docker and the kubelet count it."""
    for limit_file, usage_file, stat_file, inactive in (
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),
        (
            "memory/memory.limit_in_bytes",
            "memory/memory.usage_in_bytes",
            "memory/memory.stat",
            "total_inactive_file",
        ),
    ):
        try:
            limit = (root / limit_file).read_text().strip()
            usage = int((root / usage_file).read_text())
        except (OSError, ValueError):
            continue
        if not limit.isdigit() or int(limit) >= 2**60:
            return None
        return int(limit) - usage + _stat_value(root / stat_file, inactive)
    return None


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0
