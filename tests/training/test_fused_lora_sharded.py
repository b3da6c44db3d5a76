"""The fused LoRA forward on sharded parameters: two gloo processes, each decoder layer and
the decoder sharded by FSDP2 (`fully_shard`, the LoRA matrices DTensors split over the
ranks), each rank a half of the batch; the gathered gradients equal one process's fused
forward over both halves, averaged as FSDP averages them."""

import os
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from src.modeling import Placement, add_lora, load_base_model
from src.prompt_format import encode_chat_examples
from src.training.batching import build_rows, collate
from src.training.examples import Examples
from src.training.fused_lora import install_fused_lora
from src.training.loop import supervised_loss_sum
from tests.helpers import FACTS, OTHER_FACTS, one_thread

CPU = torch.device("cpu")
WORLD = 2


def lora_model(model_dir):
    torch.manual_seed(0)
    base = load_base_model(model_dir, False, Placement(CPU, torch.float32))
    model = add_lora(base, rank=8, alpha=16, dropout=0.0, quantized=False)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapter matter
            torch.nn.init.normal_(parameter, std=0.02)
    install_fused_lora(model)
    return model.train()


def nodes(loss: torch.Tensor) -> set[str]:
    """The names of the backward functions that made `loss` (which functions computed it)."""
    seen, names, stack = set(), set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def sharded_rank(rank: int, init_file: str, model_dir: str, batches_file: str, out: str) -> None:
    """One rank: shard, run its half of the batch forward and backward, gather the grads."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the children's logs are not the test's)
    torch.set_num_threads(1)  # as the reference's one_thread(): the same sums, same rounding
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = lora_model(model_dir)
        decoder = model.get_base_model().model
        for layer in decoder.layers:
            fully_shard(layer)
        fully_shard(decoder)  # the head stays whole: the loss reads its weight directly
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        assert all(isinstance(p, DTensor) for p in lora)
        assert lora[0].to_local().shape[0] == lora[0].shape[0] // WORLD  # rows split
        batch = torch.load(batches_file, weights_only=False)[rank]
        loss = supervised_loss_sum(model, batch, CPU)
        assert {"SharedShrinkBackward", "LoraExpandBackward", "LoraUpdateBackward"} <= nodes(loss)
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        losses = [torch.zeros(()) for _ in range(WORLD)]
        dist.all_gather(losses, loss.detach())
        if rank == 0:
            torch.save({"grads": grads, "losses": losses}, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def halves(tokenizer) -> list:
    """Two micro-batches, one per rank."""
    out = []
    for facts in (FACTS, OTHER_FACTS):
        chat = encode_chat_examples(
            tokenizer, *map(list, zip(*facts, strict=True)), [None] * len(facts)
        )
        rows, _ = build_rows(Examples.from_tokenized(chat), pack=True, wrap=False, chunk_size=128)
        out.append(collate(rows, rows.segments(np.arange(len(rows)))))
    return out


def test_sharded_lora_parameters_train_as_one_process_does(tiny_model_dir, halves, tmp_path):
    batches_file, out = tmp_path / "batches.pt", tmp_path / "grads.pt"
    torch.save(halves, batches_file)
    mp.spawn(
        sharded_rank,
        args=(str(tmp_path / "init"), str(tiny_model_dir), str(batches_file), str(out)),
        nprocs=WORLD,
    )
    sharded = torch.load(out, weights_only=False)
    with one_thread():  # (a full suite once saw the gradients 1e-4 apart without it)
        model = lora_model(tiny_model_dir)
        losses = []
        for batch in halves:
            loss = supervised_loss_sum(model, batch, CPU)
            loss.backward()
            losses.append(loss.detach())
    want = {n: p.grad / WORLD for n, p in model.named_parameters() if p.grad is not None}
    assert [float(x) for x in sharded["losses"]] == pytest.approx(
        [float(x) for x in losses], rel=1e-6
    )
    assert sharded["grads"].keys() == want.keys() and len(want) == 4 * 7 * 2
    for name, grad in want.items():
        torch.testing.assert_close(sharded["grads"][name], grad, rtol=1e-5, atol=1e-8)
