"""Which parallelism a training runs (TRAIN_PARALLELISM), and the memory plan of a sharded
base: the arithmetic from the real Llama-2-70B and 7B configs, on the cards users rent."""

from dataclasses import replace

import pytest

from src.errors import UserInputError
from src.training.memory import CPU_PLAN, GIB, MemoryModel, ModelShape
from src.training.parallelism import (
    PARALLELISM_VARIABLE,
    choose_parallelism,
    refuse_sharded_qlora,
    wanted_parallelism,
)
from tests.training.test_memory import LLAMA_2_7B

# meta-llama/Llama-2-70b-hf's config.json
LLAMA_2_70B = {
    "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000,
    "max_position_embeddings": 4096, "tie_word_embeddings": False,
}  # fmt: skip
A40, H100 = 44 * GIB, 79 * GIB


def model(config: dict = LLAMA_2_70B, quantized: bool = False, rank: int = 8) -> MemoryModel:
    return MemoryModel(ModelShape.of(config), quantized, rank)


def choose(wanted: str, memory: MemoryModel, budget: int | None, processes: int, **kw):
    node = kw.pop("node_processes", processes)
    longest = kw.pop("longest", 4096)
    return choose_parallelism(
        wanted, memory, budget, processes, node, longest, longest, cpu_plan=CPU_PLAN
    )


def test_the_70b_shape():
    shape = ModelShape.of(LLAMA_2_70B)
    assert shape.parameters == 68_976_648_192  # Llama-2-70B's published count
    assert shape.kv == 1024  # grouped-query attention: 8 key/value heads of 128
    assert model().weights / GIB == pytest.approx(128.5, abs=0.1)  # bf16: no single card


def test_70b_on_eight_a40s_plans_sharded_at_the_defaults():
    """Rows up to the 4,096-token context, rank 8: the shard, the two layers gathered at a
    time, the root and the head, the adapter and its AdamW state fit 44 GiB."""
    chosen = choose("auto", model(), A40, processes=8)
    assert chosen.sharded and chosen.shards == 8 and chosen.forwards.lockstep
    sharded = replace(model(), shards=8)
    shape = sharded.shape
    stored = -(-(80 * shape.layer_parameters + 32000 * 8192 + 8192) // 8)
    gathered = 2 * shape.layer_parameters + 32000 * 8192 + 8192
    assert sharded.weights == 2 * (stored + gathered + 32000 * 8192)  # + the unsharded head
    assert sharded.weights / GIB == pytest.approx(20.2, abs=0.1)
    plan = chosen.forwards
    assert plan.estimated_peak <= plan.budget == A40
    assert plan.checkpointed_tokens >= 4096 > plan.tokens > 0  # long rows checkpointed
    assert plan.validation_tokens >= 4096
    text = chosen.describe(8)
    assert "FSDP2, the base sharded over 8 processes" in text
    assert "does not fit one device (128.5 GiB of weights, 44.0 GiB available)" in text


def test_across_nodes_the_base_is_sharded_within_a_node_and_replicated_across():
    chosen = choose("auto", model(), A40, processes=16, node_processes=8)
    assert chosen.shards == 8
    assert "replicated 2x across nodes (HSDP)" in chosen.describe(16)


def test_what_fits_one_device_stays_data_parallel():
    chosen = choose("auto", model(LLAMA_2_7B), A40, processes=8)
    assert not chosen.sharded and chosen.shards == 1 and not chosen.forwards.lockstep
    assert "DDP (data parallel)" in chosen.describe(8)
    assert "the base and a pass fit one device (44.0 GiB)" in chosen.describe(8)
    # 4-bit 70B (about 35 GiB) on 80 GB cards: data parallel QLoRA, as before
    qlora = choose("auto", model(quantized=True), H100, processes=8)
    assert not qlora.sharded and qlora.forwards.estimated_peak <= H100


def test_fsdp_can_be_asked_for_and_ddp_refuses_what_only_sharding_fits():
    assert choose("fsdp", model(LLAMA_2_7B), A40, processes=2).sharded
    with pytest.raises(UserInputError) as error:
        choose("ddp", model(), A40, processes=8)
    message = str(error.value)
    assert "base model's weights (128.5 GiB)" in message
    assert f"{PARALLELISM_VARIABLE}=fsdp (or auto) shards the base over the 8" in message


def test_what_cannot_fit_even_sharded_is_refused_naming_the_input():
    with pytest.raises(UserInputError, match=r"even sharded over 2 processes.*lower lora_rank"):
        choose("auto", model(), A40, processes=2)
    with pytest.raises(UserInputError, match="lower lora_rank"):
        choose("auto", model(), A40, processes=1)  # nothing to shard over


def test_a_4bit_base_is_never_sharded():
    """70B in NF4 does not fit a 44 GiB card with a 4,096-token pass; sharding would need
    Params4bit under FSDP2: refused, with the reason and the input to change."""
    with pytest.raises(UserInputError) as error:
        choose("auto", model(quantized=True), A40, processes=8)
    message = str(error.value)
    assert "Params4bit does not shard correctly under FSDP2" in message
    assert "set peft_method to lora to shard the base" in message
    with pytest.raises(UserInputError, match="peft_method qlora: a 4-bit base"):
        choose("fsdp", model(LLAMA_2_7B, quantized=True), H100, processes=2)


def test_on_a_cpu_memory_does_not_decide():
    assert not choose("auto", model(LLAMA_2_7B), None, processes=2).sharded
    sharded = choose("fsdp", model(LLAMA_2_7B), None, processes=2)
    assert sharded.sharded and sharded.forwards.lockstep
    assert sharded.forwards.tokens == CPU_PLAN.tokens
    assert not choose("fsdp", model(LLAMA_2_7B), None, processes=1).sharded
    # one process a node, as on a GPU: replicated across the nodes (HSDP), as on a CPU
    across = choose("fsdp", model(LLAMA_2_7B), A40, processes=2, node_processes=1)
    assert across.sharded and across.shards == 1
    assert not choose("fsdp", model(LLAMA_2_7B), A40, processes=1).sharded  # one GPU


def test_the_setting_is_checked(monkeypatch):
    monkeypatch.delenv(PARALLELISM_VARIABLE, raising=False)
    assert wanted_parallelism() == "auto"
    monkeypatch.setenv(PARALLELISM_VARIABLE, "FSDP")
    assert wanted_parallelism() == "fsdp"
    monkeypatch.setenv(PARALLELISM_VARIABLE, "zero3")
    with pytest.raises(UserInputError, match="TRAIN_PARALLELISM must be one of auto, ddp, fsdp"):
        wanted_parallelism()


def test_sharded_qlora_is_refused_before_anything_loads(base_model_env, facts_file, monkeypatch):
    """Before the data is read: no data error, no model load gets there first."""
    from tests.helpers import call_train

    monkeypatch.setenv(PARALLELISM_VARIABLE, "fsdp")
    refuse_sharded_qlora(False)
    with pytest.raises(UserInputError, match="peft_method qlora with TRAIN_PARALLELISM=fsdp"):
        call_train(
            train_data=str(facts_file), peft_method="qlora", pack_sequences=True, chunk_size=8192
        )  # a data error, if the data were read first


def test_every_gpu_is_started_when_the_base_may_be_sharded(monkeypatch):
    """The defaults' 4 rows a step on 8 GPUs: 4 processes for a base that fits one card,
    all 8 for one that does not (each holds a shard, rows or not)."""
    from types import SimpleNamespace

    import torch

    from src.training.launcher import data_parallel_processes
    from src.training.parallelism import may_shard

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    card = SimpleNamespace(total_memory=48 * 10**9)  # an A40
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: card)
    monkeypatch.delenv(PARALLELISM_VARIABLE, raising=False)
    monkeypatch.delenv("TRAIN_PROCESSES", raising=False)
    assert not may_shard(LLAMA_2_7B, False, 8, 4096)
    assert not may_shard(LLAMA_2_70B, True, 8, 4096)  # 4-bit: never sharded
    assert may_shard(LLAMA_2_70B, False, 8, 4096)
    assert data_parallel_processes(4, may_shard(LLAMA_2_7B, False, 8, 4096)) == 4
    assert data_parallel_processes(4, may_shard(LLAMA_2_70B, False, 8, 4096)) == 8
    monkeypatch.setenv(PARALLELISM_VARIABLE, "fsdp")
    assert may_shard(LLAMA_2_7B, False, 8, 4096)
    monkeypatch.setenv(PARALLELISM_VARIABLE, "auto")
    monkeypatch.setenv("TRAIN_GPU_MEMORY_GIB", "18")  # 7B fits with short rows only
    assert may_shard(LLAMA_2_7B, False, 8, 4096) and not may_shard(LLAMA_2_7B, False, 8, 16)


def test_tied_embeddings_stay_whole_with_the_head():
    tied = MemoryModel(
        ModelShape.of({**LLAMA_2_70B, "tie_word_embeddings": True}), False, 8, shards=8
    )
    shape = tied.shape
    stored = -(-(80 * shape.layer_parameters + 8192) // 8)
    assert tied.weights == 2 * (stored + 2 * shape.layer_parameters + 8192 + 32000 * 8192)
