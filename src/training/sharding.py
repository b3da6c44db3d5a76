"""The frozen base sharded over a node's processes with FSDP2, each rank loading only its share.

Why not transformers' loading: `from_pretrained` materialises every weight in each process
(138 GB of host memory per process for Llama-2-70B) before anything could shard it. Here the
model is built on the meta device, wrapped with `fully_shard` per decoder layer and at its
root, given real (empty) storage for its shards only, and each rank reads its rows of every
weight straight from the safetensors files (`get_slice` reads just those bytes).

What is sharded and what is not:
  * the decoder layers and the root (embeddings, final norm) are sharded over the processes
    of a node (dim 0, torch.chunk's split, as FSDP2 shards); across nodes the shards are
    replicated (HSDP: a 2-D mesh of nodes x processes), so all-gathers stay inside a node;
  * the LoRA parameters are not sharded (`ignored_params`): a few hundred MB at most,
    they are summed over all ranks once per step exactly as data parallelism sums them
    (src/training/loop.py), so the LoRA gradients are the only thing crossing the network,
    every rank holds the whole adapter (keep_best_epoch, the archive need no gather), and
    the arithmetic is data parallelism's;
  * the output head is not sharded either (nor the input embeddings, where tied to it):
    the loss reads its weight directly (src/training/fused_loss.py), outside any module
    call that would gather it.
The LoRA initialisation is src/modeling.init_lora_weights (the same values as an unsharded
training's), the rotary tables are computed again on the device.
"""

import json
from pathlib import Path

import torch
import torch.nn as nn
from peft import PeftModel
from safetensors import safe_open
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from src.modeling import Placement, add_lora, attention_implementation, init_lora_weights
from src.training.continuation import LoraSettings
from src.training.distributed import World

PEFT_PREFIX = "base_model.model."


def shard_mesh(world: World, device: torch.device) -> DeviceMesh:
    """The processes of each node shard the base; nodes replicate it (HSDP)."""
    if world.nodes > 1:
        return init_device_mesh(
            device.type, (world.nodes, world.local_size), mesh_dim_names=("replicate", "shard")
        )
    return init_device_mesh(device.type, (world.size,), mesh_dim_names=("shard",))


def load_sharded_model(
    model_dir: Path, placement: Placement, lora: LoraSettings, seed: int, world: World
) -> PeftModel:
    """The base (sharded, frozen) with a fresh LoRA adapter (whole, trainable)."""
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(
            config, dtype=placement.dtype, attn_implementation=attention_implementation(placement)
        )
    base.config.use_cache = False
    if (model_dir / "generation_config.json").is_file():
        base.generation_config = GenerationConfig.from_pretrained(model_dir)
    model = add_lora(
        base, lora.rank, lora.alpha, lora.dropout, False, lora.target_modules, lora.use_rslora
    )
    unsharded = {p for p in model.parameters() if p.requires_grad}
    head = base.get_output_embeddings()
    if head is not None:
        unsharded.add(head.weight)  # tied to the input embeddings, they stay whole with it
    mesh = shard_mesh(world, placement.device)
    decoder = base.model
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh, ignored_params=unsharded)
    fully_shard(decoder, mesh=mesh, ignored_params=unsharded)
    model.to_empty(device=placement.device)
    with torch.no_grad():
        load_weights(model, model_dir, mesh)
        recompute_buffers(base, placement.device)
    init_lora_weights(model, seed)
    return model


def load_weights(model: nn.Module, model_dir: Path, mesh: DeviceMesh) -> None:
    """Every base weight of `model` from the checkpoint: a sharded one, this rank's rows."""
    files = checkpoint_files(model_dir)
    shard_index = mesh.get_local_rank("shard")
    shard_count = mesh.size(mesh.mesh_dim_names.index("shard"))
    handles = {name: safe_open(str(model_dir / name), "pt") for name in set(files.values())}
    missing = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            continue  # LoRA: initialised, not loaded
        key = checkpoint_key(name)
        if key not in files:
            missing.append(key)
            continue
        stored = handles[files[key]].get_slice(key)
        shape = tuple(stored.get_shape())
        full_shape = tuple(parameter.shape)
        if shape != full_shape:
            raise ValueError(f"{key}: the checkpoint holds {shape}, the model expects {full_shape}")
        if isinstance(parameter, DTensor):
            local = parameter.to_local()
            assert parameter.placements[-1] == Shard(0), parameter.placements
            rows = -(-shape[0] // shard_count)
            start = min(shape[0], shard_index * rows)
            if local.shape[0] != min(rows, shape[0] - start):
                raise RuntimeError(f"{name}: a shard of {local.shape[0]} rows at row {start}")
            local.copy_(stored[start : start + local.shape[0]])
        else:
            parameter.copy_(stored[:])
    if missing:
        raise ValueError(
            f"{model_dir}: the checkpoint lacks {len(missing)} weight(s) of the model, "
            f"{', '.join(missing[:3])}"
        )


def checkpoint_files(model_dir: Path) -> dict[str, str]:
    """Which safetensors file holds each weight (one file, or the index of several)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"{model_dir}: no model.safetensors(.index.json) to shard a base from")
    with safe_open(str(single), framework="pt") as handle:
        return dict.fromkeys(handle.keys(), single.name)


def checkpoint_key(name: str) -> str:
    """A parameter's name in the checkpoint: without peft's wrapper and base_layer."""
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def recompute_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (the rotary tables) come from the config, not the checkpoint:
    built on the meta device they hold nothing."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "config"):
            with torch.device(device):
                fresh = type(module)(module.config)
            for name, buffer in fresh.named_buffers(recurse=False):
                getattr(module, name).copy_(buffer)
