"""The batched decode step: rows of different lengths and adapters (two LoRA adapters and the
plain base, or a QLoRA adapter beside the base) decode together as each decodes alone; the
step over padded static buffers (what a GPU replays as a CUDA graph) equals the step itself;
the KV pool keeps its rows when it grows and when rows move."""

import pytest
import torch
from transformers import DynamicCache

from src.serving.batch_step import KVPool, StepRows, decode_step, kv_bytes_per_token, prefill
from src.serving.chat import ChatModel
from src.serving.scheduler import bucket_of
from src.serving.step_graphs import BatchedDecoder, padded_rows
from tests.helpers import FACTS, OTHER_FACTS, served_logits

STEPS = 12
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def two_adapters(base_model_env_module, facts_archive, other_facts_archive):
    """A chat model with the FACTS adapter (setup) and the OTHER_FACTS one loaded."""
    chat = ChatModel(str(facts_archive))
    served_logits(chat, FACTS[0][0], str(other_facts_archive))  # a request loads it
    assert len(chat.loaded) == 2
    return chat, list(chat.loaded)


def prompts(chat, facts) -> list[list[int]]:
    return [chat.tokenizer.encode(f"[INST] {prompt} [/INST]") for prompt, _ in facts]


def alone(chat, ids: list[int], adapter: str | None) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and every step's logits of one stream, decoded by transformers alone."""
    with chat.activate_for_prefill(adapter), torch.inference_mode():
        cache, tokens, every = DynamicCache(), [], []
        step_ids = torch.tensor([ids])
        for _ in range(STEPS):
            output = chat.model(input_ids=step_ids, cache=cache, use_cache=True, logits_to_keep=1)
            every.append(output.logits[:, -1].clone())
            tokens.append(int(every[-1].argmax()))
            step_ids = torch.tensor([[tokens[-1]]])
    return tokens, every


def together(chat, streams, decoder=None, pool_rows=4, device=CPU):
    """The same streams decoded in one batch: prefill each, then batched steps."""
    config = chat.model.config
    dtype = chat.model.get_input_embeddings().weight.dtype
    pool = KVPool.empty(config, pool_rows, 64, dtype, device)
    tokens, positions, firsts = [], [], []
    for row, (ids, adapter) in enumerate(streams):
        with chat.activate_for_prefill(adapter):
            logits, cache = prefill(chat.model, ids)
        pool.write_prompt(row, cache)
        firsts.append(logits)
        tokens.append(int(logits.argmax()))
        positions.append(len(ids))
    adapters = [adapter for _, adapter in streams]
    slots = tuple(dict.fromkeys(a for a in adapters if a))
    out, every = [[t] for t in tokens], [[f] for f in firsts]
    for _ in range(STEPS - 1):
        if decoder is None:
            rows = StepRows.build(tokens, positions, adapters, slots, device)
            logits = decode_step(chat.model, pool, rows)
        else:
            logits = decoder.step(chat.model, pool, tokens, positions, adapters)
        tokens = [int(t) for t in logits.argmax(-1)]
        positions = [p + 1 for p in positions]
        for row in range(len(streams)):
            out[row].append(tokens[row])
            every[row].append(logits[row : row + 1])
    return out, every


def assert_same_streams(chat, streams, **kwargs):
    batched_tokens, batched_logits = together(chat, streams, **kwargs)
    for (ids, adapter), got_tokens, got_logits in zip(
        streams, batched_tokens, batched_logits, strict=True
    ):
        want_tokens, want_logits = alone(chat, ids, adapter)
        assert got_tokens == want_tokens
        assert torch.equal(got_logits[0], want_logits[0])  # the prefill: the model's own
        for got, want in zip(got_logits[1:], want_logits[1:], strict=True):
            # fp32 sums in another order (a batched matmul, a masked attention)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max())


def test_rows_with_two_adapters_and_the_base_decode_as_each_alone(two_adapters):
    chat, (setup, other) = two_adapters
    ids = prompts(chat, FACTS[:3])
    streams = [(ids[0], setup), (ids[1], other), (ids[2], None)]
    assert len({len(i) for i in ids}) > 1  # rows at different positions
    assert_same_streams(chat, streams)


def test_the_adapters_change_the_answers(two_adapters):
    """(So the test above would see a row given another row's adapter.)"""
    chat, (setup, other) = two_adapters
    ids = prompts(chat, FACTS[:1])[0]
    logits = [alone(chat, ids, adapter)[1][1] for adapter in (setup, other, None)]
    assert not torch.allclose(logits[0], logits[1], rtol=1e-3, atol=1e-3)
    assert not torch.allclose(logits[0], logits[2], rtol=1e-3, atol=1e-3)


def test_the_step_over_padded_buffers_equals_the_step(two_adapters):
    """Three rows run as four (a power of two) over static buffers, as a GPU's graph
    replays them; the same step's graph serves each call of the same shape."""
    chat, (setup, other) = two_adapters
    ids = prompts(chat, OTHER_FACTS[:3])
    streams = [(ids[0], other), (ids[1], None), (ids[2], setup)]
    decoder = BatchedDecoder(torch.device("cpu"))
    assert not decoder.use_graphs  # a CPU: eager over the buffers
    assert_same_streams(chat, streams, decoder=decoder)
    assert list(decoder.steps) == [(4, tuple(sorted((setup, other))))]
    decoder.forget(other)
    assert decoder.steps == {}


def test_a_step_that_cannot_be_captured_runs_eagerly_said_once(two_adapters, monkeypatch, capsys):
    """Some stack may hold a kernel CUDA graphs cannot capture: serving goes on, eagerly."""
    chat, (setup, _) = two_adapters

    def refuse(self, step):
        raise RuntimeError("operation not permitted when stream is capturing\ndetails")

    monkeypatch.setattr(BatchedDecoder, "_capture", refuse)
    ids = prompts(chat, FACTS[:2])
    decoder = BatchedDecoder(torch.device("cpu"), graphs=True)
    assert_same_streams(chat, [(ids[0], setup), (ids[1], None)], decoder=decoder)
    assert not decoder.use_graphs
    logs = capsys.readouterr().out
    assert logs.count("note: batched decoding without CUDA graphs") == 1
    assert "(operation not permitted when stream is capturing)" in logs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_cuda_graphs_replay_the_eager_steps(
    tiny_model_dir, facts_archive, other_facts_archive, monkeypatch
):
    """On a GPU in bf16 the captured step computes what the eager step computes."""
    monkeypatch.setenv("BASE_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("PREDICT_DTYPE", "bfloat16")
    chat = ChatModel(str(facts_archive))
    served_logits(chat, FACTS[0][0], str(other_facts_archive))
    setup, other = list(chat.loaded)
    ids = prompts(chat, FACTS[:3])
    streams = [(ids[0], setup), (ids[1], other), (ids[2], None)]
    device = chat.scheduler.device
    eager = together(chat, streams, BatchedDecoder(device, graphs=False), device=device)
    graphed_decoder = BatchedDecoder(device, graphs=True)
    for _ in range(2):  # captured once, replayed after
        graphed = together(chat, streams, graphed_decoder, device=device)
        assert graphed[0] == eager[0]
        for ours, theirs in zip(graphed[1], eager[1], strict=True):
            for a, b in zip(ours, theirs, strict=True):
                assert torch.equal(a, b)
    assert graphed_decoder.use_graphs and graphed_decoder.captures >= 1


def test_qlora_rows_beside_base_rows(base_model_env, qlora_archive):
    chat = ChatModel(str(qlora_archive))
    assert chat.from_qlora
    ids = prompts(chat, FACTS[:2])
    assert_same_streams(chat, [(ids[0], chat.setup_name), (ids[1], None)])


@pytest.mark.parametrize("archive", ["facts_archive", "qlora_archive"], ids=["lora", "qlora"])
def test_a_row_s_projection_in_bf16_is_peft_s_exactly(
    base_model_env, archive, request, monkeypatch
):
    """In the serving precision of a GPU (bf16; here on the CPU) each projection of the
    batched step computes for a row exactly what peft's layer computes, with its adapter
    (LoRA's fp32 branch cast as peft casts it, 4-bit layers too) or without (its mask off)."""
    from peft.tuners.lora import LoraLayer

    from src.serving.batch_step import linear

    monkeypatch.setenv("PREDICT_DTYPE", "bfloat16")
    chat = ChatModel(str(request.getfixturevalue(archive)))
    layers = [m for m in chat.model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 7 * 4
    # one row a call: whether a matrix product rounds alike for 1 and 2 rows depends on the
    # CPU's kernels, not on what is tested here (the batch is the fp32 tests' business)
    with_adapter, without = (
        StepRows.build([0], [0], [name], (chat.setup_name,), CPU)
        for name in (chat.setup_name, None)
    )
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for layer in layers:
            x = torch.randn(1, 1, layer.base_layer.in_features, generator=generator)
            x = x.to(torch.bfloat16)
            with chat.activate_for_prefill(chat.setup_name):
                peft_with = layer(x)
            with chat.activate_for_prefill(None):
                peft_without = layer(x)
            assert linear(layer, x, with_adapter).dtype == torch.bfloat16
            assert torch.equal(linear(layer, x, with_adapter), peft_with)
            assert torch.equal(linear(layer, x, without), peft_without)
            assert not torch.equal(peft_with, layer.base_layer(x))  # it does matter


def test_the_pool_keeps_its_rows_when_it_grows_and_when_rows_move(tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    pool = KVPool.empty(config, 3, 8, torch.float32, torch.device("cpu"))
    for tensor in pool.keys + pool.values:
        tensor.normal_()
    before = [t.clone() for t in pool.keys + pool.values]
    assert pool.nbytes == sum(t.numel() * 4 for t in before)
    grown = pool.resized(config, 4, 16, keep=2)  # the first two rows are running
    assert (grown.rows, grown.length) == (4, 16)
    for old, new in zip(before, grown.keys + grown.values, strict=True):
        assert torch.equal(new[:2, :, :8], old[:2]) and not new[2:].any()
        assert not new[:, :, 8:].any()
    fewer = pool.resized(config, 2, 8, keep=2)  # a longer length may hold fewer rows
    assert (fewer.rows, fewer.length) == (2, 8)
    grown.move_row(1, 0)
    for old, new in zip(before, grown.keys + grown.values, strict=True):
        assert torch.equal(new[0, :, :8], old[1])


def test_sizes():
    config = type("Config", (), dict(hidden_size=4096, num_attention_heads=32,
                                     num_key_value_heads=32, num_hidden_layers=32))()  # fmt: skip
    assert kv_bytes_per_token(config) * 2 == 512 * 1024  # 0.5 MiB a token for 7B in bf16
    assert [bucket_of(n, 4096) for n in (1, 256, 257, 3000, 9999)] == [256, 256, 512, 4096, 4096]
    assert [padded_rows(n, 16) for n in (1, 2, 3, 5, 16)] == [1, 2, 4, 8, 16]
    assert padded_rows(9, 10) == 10
