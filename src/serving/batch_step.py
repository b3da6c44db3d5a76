"""One decode step for many streams at once, each row with its own adapter, its own length
and its own sampling, with static shapes (src/serving/step_graphs.py captures it).

The scheduler (src/serving/scheduler.py) runs every active stream's next token in one
forward pass: at batch 1 a decode step reads all the weights to make one token; with B rows
it reads them once for B tokens. transformers' caches give every row of a batch the same
length, and peft applies one active adapter to the whole batch, so the step is written out
here over the same modules (Llama's, as transformers builds them), gpt-fast style:

  * a KV pool per layer, (rows, kv heads, length, head dim): row i holds stream i's keys
    and values, written at its own position; attention reads the first `attended` positions
    of the rows (as far as the longest row has reached, a power of two), masked to each
    row's filled ones;
  * the projections that read one input (q, k and v; gate and up) each compute their base
    output once for all rows, then every row's own adapter update is added in place, the
    group's LoRA shrink shared (src/serving/adapter_stack.py);
  * the rows' state lives on the device (DecodeRows): the step reads each row's last token
    and position, samples its next token (src/serving/sampling.py) and writes both back, so
    that the next step can run before the host has looked at this one's tokens.

The prompt of a stream still runs alone through transformers (its first token's logits are
exactly those of the model run plainly, as the fidelity tests require); its keys and values
are then copied into its row of the pool.
"""

from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from torch.nn import functional as F
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from src.serving.adapter_stack import GROUPS, AdapterStack, LayerStack, StackedGroup
from src.serving.sampling import SamplingRows, sample_rows


def kv_bytes_per_token(config) -> int:
    """Keys and values of one token over all layers (0.5 MB for Llama-2-7B in bf16)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim


@dataclass
class KVPool:
    """Keys and values of the active rows: per layer (rows, kv heads, length, head dim)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def empty(cls, config, rows: int, length: int, dtype: torch.dtype, device) -> "KVPool":
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        shape = (rows, config.num_key_value_heads, length, head_dim)

        def make() -> list[torch.Tensor]:
            return [
                torch.zeros(shape, dtype=dtype, device=device)
                for _ in range(config.num_hidden_layers)
            ]

        return cls(make(), make())

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def resized(self, config, rows: int, length: int, keep: int) -> "KVPool":
        """A pool of `rows` x `length` (length at least this one's) holding this one's first
        `keep` rows."""
        assert length >= self.length and rows >= keep
        sample = self.keys[0]
        resized = KVPool.empty(config, rows, length, sample.dtype, sample.device)
        pairs = zip(resized.keys + resized.values, self.keys + self.values, strict=True)
        for target, source in pairs:
            target[:keep, :, : self.length].copy_(source[:keep])
        return resized

    def write_prompt(self, row: int, cache: DynamicCache) -> None:
        """A prompt's keys and values (from its prefill) into `row`."""
        for layer, source in enumerate(cache.layers):
            length = source.keys.shape[2]
            self.keys[layer][row, :, :length].copy_(source.keys[0])
            self.values[layer][row, :, :length].copy_(source.values[0])

    def move_row(self, source: int, target: int) -> None:
        """Row `source` into row `target` (a stream leaving makes room at the end)."""
        for tensor in self.keys + self.values:
            tensor[target].copy_(tensor[source])


@dataclass
class DecodeRows:
    """What the step reads of each row, on the device, and advances: its last token, the
    position that token goes to, its adapter's slot (-1: the plain base) and its sampling
    state. Written by the host when a stream takes a row; read and advanced by the step,
    so the host need not look at a token before the next step runs."""

    tokens: torch.Tensor  # (R,) int64
    positions: torch.Tensor  # (R,) int64
    slots: torch.Tensor  # (R,) int64
    sampling: SamplingRows

    @classmethod
    def empty(cls, rows: int, vocab: int, device: torch.device) -> "DecodeRows":
        def zeros() -> torch.Tensor:
            return torch.zeros(rows, dtype=torch.int64, device=device)

        return cls(zeros(), zeros(), zeros() - 1, SamplingRows.empty(rows, vocab, device))

    def first(self, rows: int) -> "DecodeRows":
        """Rows 0..rows-1, as views: a step over them advances these buffers."""
        return DecodeRows(
            self.tokens[:rows], self.positions[:rows], self.slots[:rows],
            self.sampling.rows(0, rows),
        )  # fmt: skip

    def start(self, row: int, token: int, position: int, slot: int) -> None:
        """A stream's first token (sampled at its prefill) and where it goes."""
        self.tokens[row], self.positions[row], self.slots[row] = token, position, slot

    def move_row(self, source: int, target: int) -> None:
        for tensor in (self.tokens, self.positions, self.slots):
            tensor[target].copy_(tensor[source])
        self.sampling.move_row(source, target)

    def clear(self, row: int) -> None:
        """No stream here: token 0 at position 0, no adapter (what a padded row decodes)."""
        self.tokens[row], self.positions[row], self.slots[row] = 0, 0, -1


def projections(
    modules: dict[str, torch.nn.Module],
    group: StackedGroup | None,
    x: torch.Tensor,
    select: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """The projections of one input: each base once for all rows, then each row's own LoRA
    update added in place (src/serving/adapter_stack.py)."""
    outputs = {name: _base(module)(x) for name, module in modules.items()}
    if group is not None and select is not None:
        group.add_updates(outputs, x, select)
    return outputs


def _base(module: torch.nn.Module) -> torch.nn.Module:
    if not isinstance(module, LoraLayer):
        return module
    if module.merged:  # a merged adapter is in the base weights: it would count twice
        raise RuntimeError("the batched decode step serves unmerged adapters only")
    return module.base_layer


def _attention(
    attention: torch.nn.Module,
    hidden: torch.Tensor,  # (B, 1, H)
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    keys: torch.Tensor,  # (B, kv heads, attended length, head dim): this layer's pool rows
    values: torch.Tensor,
    write_at: torch.Tensor,  # (B,)
    mask: torch.Tensor,  # (B, 1, 1, attended length) True where a row has a key
    layer: LayerStack | None,
    select: torch.Tensor | None,
) -> torch.Tensor:
    batch = hidden.shape[0]
    shape = (batch, 1, -1, attention.head_dim)
    names = GROUPS[0]
    qkv = projections(
        {n: getattr(attention, n) for n in names}, layer and layer.groups[names], hidden, select
    )
    query, key, value = (qkv[n].view(shape).transpose(1, 2) for n in names)
    query, key = apply_rotary_pos_emb(query, key, *cos_sin)
    every_row = torch.arange(batch, device=hidden.device)
    keys[every_row, :, write_at] = key[:, :, 0]
    values[every_row, :, write_at] = value[:, :, 0]
    output = F.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, scale=attention.scaling,
        enable_gqa=keys.shape[1] != query.shape[1],
    )  # fmt: skip  # (B, heads, 1, head dim)
    merged = output.transpose(1, 2).reshape(batch, 1, -1)
    names = GROUPS[1]
    return projections({names[0]: attention.o_proj}, layer and layer.groups[names], merged, select)[
        names[0]
    ]


def _mlp(mlp: torch.nn.Module, normed: torch.Tensor, layer, select) -> torch.Tensor:
    names = GROUPS[2]
    gate_up = projections(
        {n: getattr(mlp, n) for n in names}, layer and layer.groups[names], normed, select
    )
    names_down = GROUPS[3]
    inner = mlp.act_fn(gate_up["gate_proj"]) * gate_up["up_proj"]
    return projections(
        {"down_proj": mlp.down_proj}, layer and layer.groups[names_down], inner, select
    )["down_proj"]


def decode_step(
    model: torch.nn.Module,
    stack: AdapterStack | None,
    pool: KVPool,
    rows: DecodeRows,  # the step's rows (DecodeRows.first): pool rows 0..B-1
    attended: int,  # KV positions attended to: at least every row's position + 1
    eos_token_id: int,
    shortcuts: bool,  # sampling.sample_rows: eager per-row top-p (a CPU's) or batched
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token for every row: (tokens (B,), the logits (B, V) they were drawn from). Each
    row's key and value go into its row of the pool; its token and position advance."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    llama = causal_lm.model
    batch = rows.tokens.shape[0]
    # a row past its last position (one that ended the step before, still in flight)
    # writes the last attended slot, of its own row: nothing another row reads
    write_at = rows.positions.clamp(max=attended - 1)
    hidden = llama.embed_tokens(rows.tokens[:, None])  # (B, 1, H)
    cos_sin = llama.rotary_emb(hidden, position_ids=write_at[:, None])
    filled = torch.arange(attended, device=hidden.device)[None, :] <= write_at[:, None]
    mask = filled[:, None, None, :]  # (B, 1, 1, attended)
    select = stack.selection(rows.slots) if stack is not None else None
    for index, layer in enumerate(llama.layers):
        stacked = stack.layers[index] if stack is not None else None
        keys = pool.keys[index][:batch, :, :attended]
        values = pool.values[index][:batch, :, :attended]
        normed = layer.input_layernorm(hidden)
        hidden = hidden + _attention(
            layer.self_attn, normed, cos_sin, keys, values, write_at, mask, stacked, select
        )
        normed = layer.post_attention_layernorm(hidden)
        hidden = hidden + _mlp(layer.mlp, normed, stacked, select)
    hidden = llama.norm(hidden)
    head = projections(
        {"lm_head": causal_lm.lm_head}, stack.head if stack else None, hidden, select
    )
    logits = head["lm_head"][:, -1]
    tokens = sample_rows(logits, rows.sampling, eos_token_id, shortcuts)
    rows.tokens.copy_(tokens)
    rows.positions.copy_(write_at + 1)
    return tokens, logits


@torch.inference_mode()
def prefill(model: torch.nn.Module, prompt_ids: list[int]) -> tuple[torch.Tensor, DynamicCache]:
    """A prompt alone through transformers (the adapter its request uses active): the next
    token's logits (1, V), and the keys and values to copy into the request's row."""
    device = next(model.parameters()).device
    cache = DynamicCache()
    output = model(
        input_ids=torch.tensor([prompt_ids], device=device),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return output.logits[:, -1], cache
