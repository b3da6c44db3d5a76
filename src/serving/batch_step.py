"""One decode step for many streams at once, each row with its own adapter and its own length.

The scheduler (src/serving/scheduler.py) runs every active stream's next token in one
forward pass: at batch 1 a decode step reads all the weights to make one token; with B rows
it reads them once for B tokens. transformers' caches give every row of a batch the same
length, and peft applies one active adapter to the whole batch, so the step is written out
here over the same modules (Llama's, as transformers builds them), gpt-fast style:

  * a KV pool per layer, (rows, kv heads, length, head dim): row i holds stream i's keys
    and values, written at its own position; attention reads the pool's first rows with a
    mask of each row's filled positions;
  * each LoRA linear computes its base output once for all rows, and the low-rank update of
    every loaded adapter slot selected for the rows that use it (a row's update is its own
    adapter's, plus exact zeros): the arithmetic of peft's forward for that row, in the
    same order, the input cast to the LoRA weights' dtype as peft casts it. The thin
    matmuls run once per adapter present, over all rows (rank 8: negligible next to the
    base), with fixed shapes, so the step can be captured as it is.

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


@dataclass(frozen=True)
class StepRows:
    """What a step needs of its rows, built on the host once per step."""

    tokens: torch.Tensor  # (B,) the last token of each row
    positions: torch.Tensor  # (B,) where that token goes in its row of the pool
    adapter_masks: torch.Tensor  # (slots, B, 1, 1) bool: where a row uses a slot's adapter
    adapter_names: tuple[str | None, ...]  # the peft adapter of each slot (None: free)

    @classmethod
    def build(
        cls,
        tokens: list[int],
        positions: list[int],
        row_adapters: list[str | None],
        slots: tuple[str | None, ...],
        device: torch.device,
    ) -> "StepRows":
        index = {name: slot for slot, name in enumerate(slots) if name is not None}
        masks = torch.zeros(len(slots), len(tokens), 1, 1, dtype=torch.bool)
        for row, name in enumerate(row_adapters):
            if name is not None:
                masks[index[name], row] = True
        return cls(
            torch.tensor(tokens, dtype=torch.long).to(device, non_blocking=True),
            torch.tensor(positions, dtype=torch.long).to(device, non_blocking=True),
            masks.to(device, non_blocking=True),
            slots,
        )


def linear(module: torch.nn.Module, x: torch.Tensor, rows: StepRows) -> torch.Tensor:
    """A projection of the batch: the base for all rows, each row's own LoRA update."""
    if not isinstance(module, LoraLayer):
        return module(x)
    if module.merged:  # a merged adapter is in the base weights: it would count twice
        raise RuntimeError("the batched decode step serves unmerged adapters only")
    result = module.base_layer(x)
    result_dtype = result.dtype
    # peft's 4-bit layer casts each update to the result's dtype before adding it; its
    # plain Linear adds in the LoRA weights' dtype and casts the sum
    cast_each = _four_bit(module)
    update = None
    for slot, name in enumerate(rows.adapter_names):
        if name is None or name not in module.lora_A:
            continue
        lora_a, lora_b = module.lora_A[name], module.lora_B[name]
        wide = x.to(lora_a.weight.dtype)  # as peft casts the input
        # peft: result + lora_B(lora_A(x)) * scaling; other rows get an exact 0 (a select,
        # not a product: nothing another adapter computes, inf or NaN, reaches this row)
        term = torch.where(
            rows.adapter_masks[slot], lora_b(lora_a(wide)) * module.scaling[name], 0.0
        )
        if cast_each:
            term = term.to(result_dtype)
        update = term if update is None else update + term
    if update is None:
        return result
    return (result + update).to(result_dtype)


def _four_bit(module: torch.nn.Module) -> bool:
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # no bitsandbytes: no 4-bit layers
        return False
    return isinstance(module, Linear4bit)


def _attention(
    attention: torch.nn.Module,
    hidden: torch.Tensor,  # (B, 1, H)
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    pool: KVPool,
    layer: int,
    rows: StepRows,
    mask: torch.Tensor,  # (B, 1, 1, length) True where a row has a key
) -> torch.Tensor:
    batch = hidden.shape[0]
    shape = (batch, 1, -1, attention.head_dim)
    query = linear(attention.q_proj, hidden, rows).view(shape).transpose(1, 2)
    key = linear(attention.k_proj, hidden, rows).view(shape).transpose(1, 2)
    value = linear(attention.v_proj, hidden, rows).view(shape).transpose(1, 2)
    query, key = apply_rotary_pos_emb(query, key, *cos_sin)
    every_row = torch.arange(batch, device=hidden.device)
    keys, values = pool.keys[layer], pool.values[layer]
    keys[every_row, :, rows.positions] = key[:, :, 0]
    values[every_row, :, rows.positions] = value[:, :, 0]
    output = F.scaled_dot_product_attention(
        query,
        keys[:batch],
        values[:batch],
        attn_mask=mask,
        scale=attention.scaling,
        enable_gqa=keys.shape[1] != query.shape[1],
    )  # (B, heads, 1, head dim)
    return linear(attention.o_proj, output.transpose(1, 2).reshape(batch, 1, -1), rows)


@torch.inference_mode()
def decode_step(model: torch.nn.Module, pool: KVPool, rows: StepRows) -> torch.Tensor:
    """The next token's logits (B, V) of every row; writes each row's new key and value."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    llama = causal_lm.model
    hidden = llama.embed_tokens(rows.tokens[:, None])  # (B, 1, H)
    positions = rows.positions[:, None]
    cos_sin = llama.rotary_emb(hidden, position_ids=positions)
    filled = torch.arange(pool.length, device=hidden.device)[None, :] <= positions
    mask = filled[:, None, None, :]  # (B, 1, 1, length)
    for index, layer in enumerate(llama.layers):
        normed = layer.input_layernorm(hidden)
        hidden = hidden + _attention(layer.self_attn, normed, cos_sin, pool, index, rows, mask)
        normed = layer.post_attention_layernorm(hidden)
        mlp = layer.mlp
        gate, up = linear(mlp.gate_proj, normed, rows), linear(mlp.up_proj, normed, rows)
        hidden = hidden + linear(mlp.down_proj, mlp.act_fn(gate) * up, rows)
    hidden = llama.norm(hidden)
    return linear(causal_lm.lm_head, hidden, rows)[:, -1]


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
