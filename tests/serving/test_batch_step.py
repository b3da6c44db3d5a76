"""The batched decode step: rows of different lengths and adapters (two LoRA adapters and the
plain base, or a QLoRA adapter beside the base) decode together as each decodes alone; the
step over padded static buffers (what a GPU replays as a CUDA graph) equals the step itself;
the KV pool keeps its rows when it grows and when rows move."""

import pytest
import torch
from transformers import DynamicCache

from src.serving.adapter_stack import AdapterStack, largest_rank
from src.serving.batch_step import DecodeRows, KVPool, decode_step, kv_bytes_per_token, prefill
from src.serving.chat import ChatModel
from src.serving.sampling import SamplingSettings, sample_rows
from src.serving.scheduler import bucket_of
from src.serving.step_graphs import BatchedDecoder, attended_length, padded_rows
from tests.helpers import FACTS, OTHER_FACTS, served_logits

STEPS = 12
CPU = torch.device("cpu")
EOS_NEVER = -1  # these tests decode a fixed number of tokens


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


GREEDY = SamplingSettings(max_new_tokens=STEPS, temperature=1.0, top_k=1, top_p=1.0,
                          repetition_penalty=1.0)  # fmt: skip  # top-k 1: the argmax


def stack_of(chat) -> AdapterStack | None:
    if not chat.loaded:
        return None
    return AdapterStack.build(chat.model, 4, largest_rank(chat.model))


def together(chat, streams, decoder=None, pool_rows=4, pool_length=64, device=CPU, stack=None,
             pool=None, rows=None):  # fmt: skip
    """The same streams decoded in one batch: prefill each, then batched steps (greedy,
    sampled in the step). Returns each row's tokens and every step's logits."""
    config = chat.model.config
    dtype = chat.model.get_input_embeddings().weight.dtype
    pool = pool or KVPool.empty(config, pool_rows, pool_length, dtype, device)
    rows = rows or DecodeRows.empty(pool_rows, config.vocab_size, device)
    stack = stack or stack_of(chat)
    decoder = decoder or BatchedDecoder(device, EOS_NEVER)
    out, every, positions = [], [], []
    for row, (ids, adapter) in enumerate(streams):
        with chat.activate_for_prefill(adapter):
            logits, cache = prefill(chat.model, ids)
        pool.write_prompt(row, cache)
        rows.sampling.set_row(row, GREEDY, 0, ids)
        token = int(sample_rows(logits, rows.sampling.rows(row, row + 1), EOS_NEVER, True))
        slot = -1 if adapter is None else stack.assign(adapter, set())
        rows.start(row, token, len(ids), slot)
        out.append([token])
        every.append([logits])
        positions.append(len(ids))
    for _ in range(STEPS - 1):
        launched = decoder.launch(
            chat.model, stack, pool, rows, len(streams), max(positions), keep_logits=True
        )
        tokens = launched.read()
        positions = [p + 1 for p in positions]
        for row in range(len(streams)):
            out[row].append(tokens[row])
            every[row].append(launched.logits[row : row + 1])
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
    replays them; the same step serves each call of the same shape, whichever adapters
    come and go in the stack's slots."""
    chat, (setup, other) = two_adapters
    ids = prompts(chat, OTHER_FACTS[:3])
    streams = [(ids[0], other), (ids[1], None), (ids[2], setup)]
    decoder = BatchedDecoder(CPU, EOS_NEVER)
    assert not decoder.use_graphs and not decoder.use_compile  # a CPU: eager over the buffers
    stack = stack_of(chat)
    buffers = dict(
        pool=KVPool.empty(chat.model.config, 4, 64, torch.float32, CPU),
        rows=DecodeRows.empty(4, chat.model.config.vocab_size, CPU),
    )
    assert_same_streams(chat, streams, decoder=decoder, stack=stack, **buffers)
    assert list(decoder.steps) == [(4, 64)]  # (rows, attended): no adapter in the key
    stack.release(other)  # written again into a free slot: the same buffers, the same steps
    streams = [(ids[0], None), (ids[1], other)]
    assert_same_streams(chat, streams, decoder=decoder, stack=stack, **buffers)
    assert list(decoder.steps) == [(4, 64), (2, 64)] and stack.version == 0


def test_a_long_pool_is_attended_only_as_far_as_the_rows_reach(two_adapters):
    """Short rows in a pool of 1,024 positions attend to its first 256 (the rest is never
    read): the same logits as attending to all."""
    chat, (setup, other) = two_adapters
    ids = prompts(chat, FACTS[:2])
    decoder = BatchedDecoder(CPU, EOS_NEVER)
    assert_same_streams(chat, [(ids[0], setup), (ids[1], other)], decoder=decoder,
                        pool_length=1024)  # fmt: skip
    assert list(decoder.steps) == [(2, 256)]
    assert [attended_length(p, 1024) for p in (0, 255, 256, 700, 1023)] == [
        256, 256, 512, 1024, 1024,
    ]  # fmt: skip
    assert attended_length(10, 64) == 64


def test_the_compiled_step_has_no_graph_break_and_decodes_alike(two_adapters):
    """torch.compile of the whole step (sampling included), fullgraph: on a GPU its fused
    kernels run inside the CUDA graph; here on the CPU, the same function compiled."""
    chat, (setup, other) = two_adapters
    ids = prompts(chat, FACTS[:3])
    streams = [(ids[0], setup), (ids[1], other), (ids[2], None)]
    decoder = BatchedDecoder(CPU, EOS_NEVER, compiled=True)
    eager_tokens, eager_logits = together(chat, streams)
    tokens, logits = together(chat, streams, decoder=decoder)
    assert decoder.use_compile  # no fallback: fullgraph=True raises at a graph break
    assert tokens == eager_tokens
    for ours, theirs in zip(logits, eager_logits, strict=True):
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max())


def test_a_step_that_cannot_be_captured_or_compiled_runs_eagerly_said_once(
    two_adapters, monkeypatch, capsys
):
    """Some stack may hold a kernel CUDA graphs cannot capture, or an operation the
    compiler cannot take: serving goes on, eagerly."""
    chat, (setup, _) = two_adapters

    def refuse(self, step, rows, run):
        raise RuntimeError("operation not permitted when stream is capturing\ndetails")

    def cannot_compile(function, **kwargs):
        def broken(*args):
            raise torch._dynamo.exc.Unsupported("graph break: a bitsandbytes kernel")

        return broken

    monkeypatch.setattr(BatchedDecoder, "_capture", refuse)
    monkeypatch.setattr(torch, "compile", cannot_compile)
    ids = prompts(chat, FACTS[:2])
    decoder = BatchedDecoder(CPU, EOS_NEVER, graphs=True, compiled=True)
    assert_same_streams(chat, [(ids[0], setup), (ids[1], None)], decoder=decoder)
    assert not decoder.use_graphs and not decoder.use_compile
    logs = capsys.readouterr().out
    assert logs.count("note: batched decoding without CUDA graphs") == 1
    assert "(operation not permitted when stream is capturing)" in logs
    assert logs.count("note: decoding without torch.compile (graph break") == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_cuda_graphs_replay_the_eager_steps(
    tiny_model_dir, facts_archive, other_facts_archive, monkeypatch, compiled
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
    eager_decoder = BatchedDecoder(device, EOS_NEVER, graphs=False, compiled=compiled)
    eager = together(chat, streams, eager_decoder, device=device)
    graphed_decoder = BatchedDecoder(device, EOS_NEVER, graphs=True, compiled=compiled)
    for _ in range(2):  # captured on each new pool (a pool is new each time here)
        graphed = together(chat, streams, graphed_decoder, device=device)
        assert graphed[0] == eager[0]
        for ours, theirs in zip(graphed[1], eager[1], strict=True):
            for a, b in zip(ours, theirs, strict=True):
                assert torch.equal(a, b)
    assert graphed_decoder.use_graphs and graphed_decoder.captures >= 1
    assert graphed_decoder.use_compile == compiled


def test_qlora_rows_beside_base_rows(base_model_env, qlora_archive):
    chat = ChatModel(str(qlora_archive))
    assert chat.from_qlora
    ids = prompts(chat, FACTS[:2])
    assert_same_streams(chat, [(ids[0], chat.setup_name), (ids[1], None)])


@pytest.mark.parametrize("archive", ["facts_archive", "qlora_archive"], ids=["lora", "qlora"])
def test_a_row_s_projection_in_bf16_is_peft_s(base_model_env, archive, request, monkeypatch):
    """In the serving precision of a GPU (bf16; here on the CPU) each projection of the
    step computes for a row what peft's layer computes with its adapter (the fp32 branch,
    rounded to bf16 once as peft rounds it, 4-bit layers too), and the base layer's output
    exactly for a row without one."""
    from peft.tuners.lora import LoraLayer

    from src.serving.adapter_stack import GROUPS
    from src.serving.batch_step import projections

    monkeypatch.setenv("PREDICT_DTYPE", "bfloat16")
    chat = ChatModel(str(request.getfixturevalue(archive)))
    name = chat.setup_name
    stack = stack_of(chat)
    select = stack.selection(torch.tensor([stack.assign(name, set()), -1]))
    generator = torch.Generator().manual_seed(0)
    checked = 0
    with torch.inference_mode(), chat.activate_for_prefill(name):
        layers = chat.model.base_model.model.model.layers
        for layer, stacked in zip(layers, stack.layers, strict=True):
            owners = {**dict.fromkeys(GROUPS[0] + GROUPS[1], layer.self_attn),
                      **dict.fromkeys(GROUPS[2] + GROUPS[3], layer.mlp)}  # fmt: skip
            for group in GROUPS:
                modules = {n: getattr(owners[n], n) for n in group}
                features = modules[group[0]].base_layer.in_features
                x = torch.randn(2, 1, features, generator=generator).to(torch.bfloat16)
                ours = projections(modules, stacked.groups[group], x, select)
                for n, module in modules.items():
                    assert isinstance(module, LoraLayer)
                    peft, base = module(x[:1]), module.base_layer(x[1:])
                    assert ours[n].dtype == torch.bfloat16
                    # one rounding to bf16 either way; the fp32 shrink's sum of products may
                    # run in another order (a wider matmul): one bf16 step at most
                    ulp = peft.abs().max() * 2**-7
                    assert (ours[n][:1] - peft).abs().max() <= ulp
                    assert not torch.equal(peft, module.base_layer(x[:1]))  # it does matter
                    assert torch.equal(ours[n][1:], base)  # the row without one: the base
                    checked += 1
    assert checked == 7 * 4  # (bit for bit in 27 or 28 of them on the development CPU: how
    # many depends on the CPU's bf16 kernels, so it is not asserted)


@pytest.mark.parametrize("archive", ["facts_archive", "qlora_archive"], ids=["lora", "qlora"])
def test_decoding_in_bf16_stays_within_what_bf16_itself_costs(
    base_model_env, archive, request, monkeypatch
):
    """The fidelity bound of tests/serving/test_fidelity.py, at every decode step: the
    step's bf16 logits are about as far from the trained model in fp32 as the trained model
    in bf16 (peft's forward over the whole sequence) is, on the same tokens. Not exactly
    within: the step rounds in another order (a cache, a masked attention); measured on
    the tests' adapters, 0.98 to 1.00 of the bound with LoRA, 1.015 with QLoRA, where a
    LoRA branch in bf16 instead of fp32 gave 1.07 to 1.09."""
    weights = str(request.getfixturevalue(archive))
    monkeypatch.setenv("PREDICT_DTYPE", "float32")
    reference = ChatModel(weights)
    monkeypatch.setenv("PREDICT_DTYPE", "bfloat16")
    chat = ChatModel(weights)
    ids = prompts(chat, FACTS[:2])
    streams = [(ids[0], chat.setup_name), (ids[1], chat.setup_name)]
    tokens, logits = together(chat, streams)
    for row, (prompt, adapter) in enumerate(streams):
        sequence = prompt + tokens[row][:-1]  # teacher-forced: the tokens the step decoded
        fp32 = teacher_forced(reference, sequence, len(prompt), reference.setup_name)
        bf16 = teacher_forced(chat, sequence, len(prompt), adapter)
        ours = torch.cat(logits[row][1:]).float()
        bound = (bf16 - fp32).abs().max()
        assert bound > 0 and (ours - fp32).abs().max() <= 1.05 * bound


def teacher_forced(chat, sequence, prompt_length, adapter) -> torch.Tensor:
    """(steps, V) fp32 logits of each position after the prompt's first token, by peft."""
    with chat.activate_for_prefill(adapter), torch.inference_mode():
        output = chat.model(input_ids=torch.tensor([sequence]))
    return output.logits[0, prompt_length:].float()


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


def test_warm_up_steps_leave_the_rows_as_they_were(two_adapters):
    """A capture's (or a compile's) warm-up steps sample and advance the rows: undone."""
    chat, (setup, other) = two_adapters
    ids = prompts(chat, FACTS[:2])
    stack = stack_of(chat)
    pool = KVPool.empty(chat.model.config, 2, 64, torch.float32, CPU)
    rows = DecodeRows.empty(2, chat.model.config.vocab_size, CPU)
    for row, adapter in enumerate((setup, other)):
        with chat.activate_for_prefill(adapter):
            _, cache = prefill(chat.model, ids[row])
        pool.write_prompt(row, cache)
        rows.sampling.set_row(row, SamplingSettings(max_new_tokens=9), 7, ids[row])
        rows.start(row, 5, len(ids[row]), stack.assign(adapter, set()))
    state = [t.clone() for t in (rows.tokens, rows.positions, rows.sampling.produced,
                                 rows.sampling.seen)]  # fmt: skip

    def run():
        with torch.inference_mode():
            decode_step(chat.model, stack, pool, rows, 64, EOS_NEVER, True)

    BatchedDecoder._without_advancing(rows, run, times=2)
    after = (rows.tokens, rows.positions, rows.sampling.produced, rows.sampling.seen)
    for before, now in zip(state, after, strict=True):
        assert torch.equal(before, now)
    run()
    assert not torch.equal(state[1], rows.positions)  # (a step does advance them)


def test_a_row_past_its_end_writes_only_its_own_last_slot(two_adapters):
    """A row that ended in the step before (still in flight on a GPU) may run past the
    attended length: it writes the last attended slot of its own row, nothing else."""
    chat, _ = two_adapters
    config = chat.model.config
    pool = KVPool.empty(config, 2, 64, torch.float32, CPU)
    for tensor in pool.keys + pool.values:
        tensor.normal_()
    before = [t.clone() for t in pool.keys + pool.values]
    rows = DecodeRows.empty(2, config.vocab_size, CPU)
    rows.start(0, 5, 10, -1)
    rows.start(1, 5, 64 + 3, -1)  # past the pool's end
    with torch.inference_mode():
        decode_step(chat.model, None, pool, rows, 64, EOS_NEVER, True)
    for old, new in zip(before, pool.keys + pool.values, strict=True):
        changed = (old != new).any(-1).nonzero().tolist()  # (row, head, position)
        assert {(row, position) for row, _, position in changed} == {(0, 10), (1, 63)}
    assert rows.positions.tolist() == [11, 64]


def test_adapters_of_other_ranks_and_scales_share_the_stack(two_adapters):
    """A rank-32 adapter with a scale of 1.5 (not a power of two) beside the rank-16 ones:
    the narrower ones zero-padded in the wider slots, each row as it decodes alone."""
    from peft import LoraConfig

    from src.modeling import LORA_TARGET_MODULES
    from src.serving.chat import LoadedAdapter

    chat, (setup, other) = two_adapters
    wide = LoraConfig(r=32, lora_alpha=48, target_modules=LORA_TARGET_MODULES,
                      init_lora_weights=False)  # fmt: skip
    chat.model.add_adapter("wide", wide)
    chat.loaded["wide"] = LoadedAdapter("wide", "wide", None)
    try:
        stack = stack_of(chat)
        assert stack.rank_capacity == 32
        ids = prompts(chat, FACTS[:3])
        assert_same_streams(chat, [(ids[0], "wide"), (ids[1], setup), (ids[2], other)],
                            stack=stack)  # fmt: skip
        small = AdapterStack.build(chat.model, 2, 16)
        assert small.covers(chat.model, setup) and not small.covers(chat.model, "wide")
        small.assign(setup, set())
        small.assign(other, set())
        assert small.assign("late", {other}) == small.slot_of["late"] != small.slot_of[other]
        assert setup not in small.slot_of  # the one no running row used gave its slot
        with pytest.raises(RuntimeError, match="all 2 adapter slots are in use"):
            small.assign(setup, {other, "late"})
    finally:
        chat.loaded.pop("wide")
        chat.model.delete_adapter("wide")


def test_predict_compile_says_when_the_step_is_compiled(monkeypatch):
    from src.errors import UserInputError
    from src.serving.step_graphs import compile_wanted

    cuda = torch.device("cuda")
    monkeypatch.delenv("PREDICT_COMPILE", raising=False)
    assert compile_wanted(cuda) and not compile_wanted(CPU)  # auto: on a GPU
    monkeypatch.setenv("PREDICT_COMPILE", "1")
    assert compile_wanted(CPU)
    monkeypatch.setenv("PREDICT_COMPILE", "0")
    assert not compile_wanted(cuda)
    monkeypatch.setenv("PREDICT_COMPILE", "sometimes")
    with pytest.raises(UserInputError, match="PREDICT_COMPILE must be auto, 1 or 0, got 'som"):
        compile_wanted(cuda)


def test_sizes():
    config = type("Config", (), dict(hidden_size=4096, num_attention_heads=32,
                                     num_key_value_heads=32, num_hidden_layers=32))()  # fmt: skip
    assert kv_bytes_per_token(config) * 2 == 512 * 1024  # 0.5 MiB a token for 7B in bf16
    assert [bucket_of(n, 4096) for n in (1, 256, 257, 3000, 9999)] == [256, 256, 512, 4096, 4096]
    assert [padded_rows(n, 16) for n in (1, 2, 3, 5, 16)] == [1, 2, 4, 8, 16]
    assert padded_rows(9, 10) == 10
