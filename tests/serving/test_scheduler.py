"""Many requests at once through the chat model's scheduler (threads here; Cog's coroutines in
tests/test_predict_server.py): each answer is what the request gets alone, with its own
adapter, seed and settings; over the KV budget a request waits, not refused; with every
adapter slot in use by others a newcomer waits, never evicting one in use; a reader gone
frees its row; a request that fails fails alone; an adapter loads while the other streams
decode."""

import shutil
import threading
import time

import pytest
import torch

import src.serving.chat
from src.serving.chat import ChatModel, build_chat_request
from src.serving.generation import GenerationStats
from src.serving.scheduler import Channel
from tests.helpers import FACTS, GREEDY_INPUTS, OTHER_FACTS, wait_for

LONG = dict(max_new_tokens=60, min_new_tokens=60)  # long enough for the streams to overlap


def request(prompt: str, **overrides):
    return build_chat_request(**{**GREEDY_INPUTS, "prompt": prompt, **overrides})


def at_once(chat: ChatModel, requests: list) -> list:
    """Answers of `requests` asked from threads at the same time (an exception: its answer)."""
    answers: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def ask(index: int) -> None:
        start.wait()
        try:
            answers[index] = "".join(chat.chat(requests[index]))
        except Exception as error:
            answers[index] = error

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return answers


def only_the_setup_adapter(chat: ChatModel) -> None:
    """Evict what earlier tests left loaded beside the setup weights."""
    for name in list(chat.loaded):
        if name != chat.setup_name:
            chat._evict(name)


def one_by_one(chat: ChatModel, requests: list) -> list[str]:
    return ["".join(chat.chat(r)) for r in requests]


@pytest.fixture(scope="module")
def slots_env():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COG_MAX_CONCURRENCY", "4")
        yield


@pytest.fixture(scope="module")
def chat(base_model_env_module, slots_env, facts_archive) -> ChatModel:
    return ChatModel(str(facts_archive))


def test_concurrent_requests_get_what_each_gets_alone(chat, other_facts_archive):
    """The setup adapter, a replicate_weights adapter and the plain base in one batch;
    greedy, seeded sampling and repetition penalty; each as it is answered alone."""
    other = str(other_facts_archive)
    requests = [
        request(FACTS[0][0], **LONG),
        request(FACTS[1][0], replicate_weights=other, **LONG),
        request(FACTS[2][0], temperature=0.8, top_p=0.9, seed=7, **LONG),
        request(OTHER_FACTS[0][0], temperature=1.0, top_k=20, repetition_penalty=1.3, seed=3,
                replicate_weights=other, max_new_tokens=40),
    ]  # fmt: skip
    alone = one_by_one(chat, requests)
    chat.scheduler.most_rows = 0
    assert at_once(chat, requests) == alone
    assert chat.scheduler.most_rows >= 2  # they did decode together
    trained = at_once(chat, [request(p) for p, _ in FACTS[:3]])
    assert trained == [answer for _, answer in FACTS[:3]]  # and the trained answers come back
    assert not chat.in_use and not chat.scheduler.active


def test_pipelined_steps_answer_as_steps_read_at_once(chat, other_facts_archive):
    """A GPU's order (the host reads a step's tokens once the next step is enqueued) gives
    the same answers as a CPU's (each step read when it is done): a stream that ended, by
    EOS, by max_new_tokens or by a stop sequence, gets nothing of the step in flight."""
    other = str(other_facts_archive)
    requests = [
        request(FACTS[0][0]),  # the trained answer, then EOS
        request(FACTS[1][0], replicate_weights=other, **LONG),
        request(FACTS[2][0], temperature=0.8, top_p=0.9, seed=7, max_new_tokens=5),
        request(FACTS[3][0], stop_sequences="legs"),
        request(OTHER_FACTS[0][0], temperature=1.0, top_k=20, seed=3, replicate_weights=other,
                max_new_tokens=40),
    ]  # fmt: skip
    read_at_once = at_once(chat, requests)
    assert read_at_once[0] == FACTS[0][1] and read_at_once[3] == "A vorpal crab has eleven "
    chat.scheduler.pipelined = True
    try:
        assert at_once(chat, requests) == read_at_once
        assert one_by_one(chat, requests) == read_at_once
    finally:
        chat.scheduler.pipelined = False
    assert not chat.in_use and not chat.scheduler.active


def test_a_stream_crossing_the_attended_length_decodes_as_generate(chat):
    """A prompt of about 250 tokens and 30 new ones: its steps attend to 256 positions, then
    to 512, as far as the stream has reached; greedy, its tokens are transformers'."""
    prompt = " ".join(["llamas graze in the high Andes"] * 27)
    new = dict(max_new_tokens=30, min_new_tokens=30)
    stats = GenerationStats()
    answer = "".join(chat.chat(request(prompt, **new), stats))
    prepared = chat.prepare(request(prompt, **new))
    assert len(prepared.prompt_ids) < 256 < len(prepared.prompt_ids) + 30
    with chat.activate_for_prefill(chat.setup_name), torch.inference_mode():
        ids = torch.tensor([prepared.prompt_ids])
        out = chat.model.generate(ids, max_new_tokens=30, min_new_tokens=30, do_sample=False,
                                  pad_token_id=0)  # fmt: skip
    chat._release(prepared, False)
    expected = chat.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert stats.output_tokens == 30 and answer == expected.strip()


def test_an_adapter_of_a_wider_rank_joins_running_rows(chat):
    """A stream whose adapter needs more slots and a wider rank than the stack has joins
    streams that are running: the stack is built anew under them, each still gets what it
    gets alone."""
    from peft import LoraConfig

    from src.modeling import LORA_TARGET_MODULES
    from src.serving.chat import LoadedAdapter, PreparedRequest

    only_the_setup_adapter(chat)
    wide = LoraConfig(r=32, lora_alpha=48, target_modules=LORA_TARGET_MODULES,
                      init_lora_weights=False)  # fmt: skip
    chat.model.add_adapter("wide", wide)
    chat.loaded["wide"] = LoadedAdapter("wide", "wide", None)

    def with_wide(prompt: str) -> PreparedRequest:
        base = chat.prepare(request(prompt, **LONG))
        return PreparedRequest(base.request, base.prompt_ids, base.settings, "wide", None,
                               None, None)  # fmt: skip

    def answer(prepared) -> str:
        channel = Channel()
        _, reader = chat._submit(prepared, channel, GenerationStats())
        pieces = []
        while True:
            piece, done = reader.take(channel.get())
            pieces.append(piece)
            if done:
                return "".join(pieces)

    try:
        longer = dict(max_new_tokens=200, min_new_tokens=200)  # still running when it joins
        alone = [answer(chat.prepare(request(FACTS[0][0], **longer))), answer(with_wide("Hi."))]
        versions = []
        started = threading.Event()

        def setup_stream():
            prepared = chat.prepare(request(FACTS[0][0], **longer))
            channel = Channel()
            _, reader = chat._submit(prepared, channel, GenerationStats())
            pieces = [reader.take(channel.get())[0]]
            started.set()  # running: the wide one joins it
            while True:
                piece, done = reader.take(channel.get())
                pieces.append(piece)
                if done:
                    results[0] = "".join(pieces)
                    return

        results = [None, None]
        chat.scheduler.stack = None  # a stack of one slot, rank 16: the setup adapter's
        chat.scheduler.most_rows = 0
        first = threading.Thread(target=setup_stream)
        first.start()
        assert started.wait(60)
        wait_for(lambda: chat.scheduler.stack is not None, 30)  # (its slot comes after)
        assert chat.scheduler.stack.capacity == 1
        versions.append(chat.scheduler.stack.version)
        results[1] = answer(with_wide("Hi."))
        first.join(60)
        assert results == alone and chat.scheduler.most_rows == 2  # they ran together
        assert chat.scheduler.stack.version > versions[0]  # built anew under the running row
        assert chat.scheduler.stack.rank_capacity == 32 and chat.scheduler.stack.capacity == 2
    finally:
        chat.loaded.pop("wide")
        chat.model.delete_adapter("wide")
        chat.scheduler.forget_adapter("wide")


def test_over_the_kv_budget_requests_wait_their_turn(base_model_env, facts_archive, monkeypatch):
    monkeypatch.setenv("COG_MAX_CONCURRENCY", "4")
    probe = ChatModel(str(facts_archive))
    one_row = 256 * probe.plan.bytes_per_token  # a short chat's bucket
    monkeypatch.setenv("PREDICT_KV_CACHE_GIB", str(1.5 * one_row / 2**30))
    chat = ChatModel(str(facts_archive))
    assert chat.plan.rows_at(256) == 1
    requests = [request(p, **LONG) for p, _ in FACTS[:3]]
    assert at_once(chat, requests) == one_by_one(chat, requests)
    assert chat.scheduler.most_rows == 1


def test_a_newcomer_waits_for_an_adapter_slot_in_use(
    chat, other_facts_archive, tmp_path, monkeypatch
):
    """The cache holds the setup adapter and one more; two requests with two other adapters
    at once: the second waits for the first to finish (its adapter is never evicted while
    it decodes), then both answer as alone."""
    monkeypatch.setattr(src.serving.chat, "MAX_LOADED_ADAPTERS", 2)
    only_the_setup_adapter(chat)
    second = tmp_path / "second.tar"
    shutil.copy(other_facts_archive, second)
    requests = [
        request(FACTS[0][0], replicate_weights=str(other_facts_archive), **LONG),
        request(FACTS[1][0], replicate_weights=str(second), **LONG),
    ]
    evicted = []
    real_evict = chat._evict

    def evict(name):
        assert chat.in_use[name] <= 0, "evicted an adapter in use"
        evicted.append(name)
        real_evict(name)

    monkeypatch.setattr(chat, "_evict", evict)
    chat.scheduler.most_rows = 0
    answers = at_once(chat, requests)
    assert chat.scheduler.most_rows == 1  # one after the other
    assert evicted  # the second's turn came by evicting the first's, once it was done
    monkeypatch.setattr(src.serving.chat, "MAX_LOADED_ADAPTERS", 4)
    assert answers == one_by_one(chat, requests)


ENDLESS = dict(max_new_tokens=3000, min_new_tokens=3000)  # a minute on this CPU: until it goes


def rows_gone(chat: ChatModel, timeout: float = 10.0) -> None:
    """The scheduler holds no row, waits for nothing and pins nothing, soon."""
    deadline = time.monotonic() + timeout
    scheduler = chat.scheduler
    while scheduler.active or scheduler.waiting or chat.in_use or chat.pending:
        assert time.monotonic() < deadline, "the row did not leave"
        time.sleep(0.01)


def test_a_reader_gone_frees_its_row(chat):
    stream = chat.chat(request(FACTS[0][0], **ENDLESS))
    assert next(stream)
    stream.close()  # a client gone
    rows_gone(chat)
    steps = chat.scheduler.steps
    time.sleep(0.2)
    assert chat.scheduler.steps == steps  # nothing decodes for it any more
    assert one_by_one(chat, [request(FACTS[0][0])]) == [FACTS[0][1]]


def test_a_canceled_coroutine_frees_its_row_and_its_place_in_the_queue(
    base_model_env, facts_archive, monkeypatch
):
    """Cog cancels the coroutine of a client gone: a decoding stream leaves its row, and
    one waiting for KV room leaves the queue (one row's budget here)."""
    import asyncio

    monkeypatch.setenv("COG_MAX_CONCURRENCY", "4")
    probe = ChatModel(str(facts_archive))
    monkeypatch.setenv("PREDICT_KV_CACHE_GIB", str(1.5 * 256 * probe.plan.bytes_per_token / 2**30))
    chat = ChatModel(str(facts_archive))

    async def scenario() -> None:
        async def read(inputs) -> None:
            async for _ in chat.achat(inputs):
                pass

        running = asyncio.create_task(read(request(FACTS[0][0], **ENDLESS)))
        while not chat.scheduler.active:
            await asyncio.sleep(0.01)
        waiting = asyncio.create_task(read(request(FACTS[1][0], **ENDLESS)))
        while not chat.scheduler.waiting:
            await asyncio.sleep(0.01)
        waiting.cancel()
        while chat.scheduler.waiting:
            await asyncio.sleep(0.01)
        assert len(chat.scheduler.active) == 1  # the other decodes on
        running.cancel()
        await asyncio.gather(running, waiting, return_exceptions=True)

    asyncio.run(scenario())
    rows_gone(chat)


def test_a_request_canceled_while_it_is_prepared_leaves_nothing(
    chat, other_facts_archive, monkeypatch
):
    """Cancelled during `prepare` (its replicate_weights fetched and unpacked on a worker
    thread): once that thread is done, what it pinned goes back and its folder goes."""
    import asyncio

    only_the_setup_adapter(chat)
    prepared, go_on = threading.Event(), threading.Event()
    real_prepare = chat.prepare

    def slow_prepare(inputs):
        result = real_prepare(inputs)
        prepared.set()
        assert go_on.wait(timeout=60)
        return result

    monkeypatch.setattr(chat, "prepare", slow_prepare)
    folders = set(chat.store.root.iterdir())

    async def scenario() -> None:
        async def read() -> None:
            async for _ in chat.achat(
                request(FACTS[1][0], replicate_weights=str(other_facts_archive))
            ):
                pass

        task = asyncio.create_task(read())
        while not prepared.is_set():
            await asyncio.sleep(0.01)
        assert chat.pending  # its folder held for it
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        go_on.set()

    asyncio.run(scenario())
    wait_for(lambda: not chat.pending, timeout=10)
    assert set(chat.store.root.iterdir()) == folders  # its unpacked folder gone


def test_a_request_waiting_for_an_adapter_slot_lets_the_others_pass(
    chat, other_facts_archive, tmp_path, monkeypatch
):
    """The cache holds the setup adapter and one more, in use by a long stream: a request
    with a third adapter waits for it, and one with the setup weights, asked after it,
    answers meanwhile."""
    monkeypatch.setattr(src.serving.chat, "MAX_LOADED_ADAPTERS", 2)
    only_the_setup_adapter(chat)
    third = tmp_path / "third.tar"
    shutil.copy(other_facts_archive, third)
    long = []
    reader = threading.Thread(target=lambda: long.extend(chat.chat(
        request(FACTS[0][0], replicate_weights=str(other_facts_archive), max_new_tokens=400,
                min_new_tokens=400))))  # fmt: skip
    reader.start()
    wait_for(lambda: len(long) > 0, timeout=60)
    blocked: list = []
    asker = threading.Thread(target=lambda: blocked.extend(
        chat.chat(request(FACTS[1][0], replicate_weights=str(third)))))  # fmt: skip
    asker.start()
    wait_for(lambda: len(chat.scheduler.waiting) == 1, timeout=30)
    assert one_by_one(chat, [request(FACTS[2][0])]) == [FACTS[2][1]]  # passed it
    assert reader.is_alive() and not blocked  # the long stream still runs; the third waits
    reader.join(timeout=300)
    asker.join(timeout=120)
    monkeypatch.setattr(src.serving.chat, "MAX_LOADED_ADAPTERS", 4)
    assert (
        "".join(blocked)
        == one_by_one(chat, [request(FACTS[1][0], replicate_weights=str(third))])[0]
    )


def pool_peaks(monkeypatch) -> tuple[list[int], list[tuple]]:
    """The bytes of every KV pool allocated (with the old one while rows are copied into a
    new one: both exist), and the copies made."""
    from src.serving.batch_step import KVPool

    peaks, copies = [], []
    real_empty, real_resized = KVPool.empty, KVPool.resized

    def empty(config, rows, length, dtype, device):
        pool = real_empty(config, rows, length, dtype, device)
        peaks.append(pool.nbytes)
        return pool

    def resized(self, config, rows, length, keep):
        pool = real_resized(self, config, rows, length, keep)
        peaks.append(self.nbytes + peaks.pop())
        copies.append(((self.rows, self.length), (rows, length), keep))
        return pool

    monkeypatch.setattr(KVPool, "empty", staticmethod(empty))
    monkeypatch.setattr(KVPool, "resized", resized)
    return peaks, copies


def short_chats_then_a_long_one(chat: ChatModel) -> tuple[list, list]:
    # long enough to be running still when the long one comes (a 256 bucket each)
    shorts = [request(p, max_new_tokens=200, min_new_tokens=200) for p, _ in FACTS[:3]]
    long = request("llama " * 100, max_new_tokens=100, min_new_tokens=100)  # a 512 bucket
    answers: list = [None] * 4

    def ask(index: int, inputs) -> None:
        answers[index] = "".join(chat.chat(inputs))

    threads = [threading.Thread(target=ask, args=(i, r)) for i, r in enumerate(shorts)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(chat.scheduler.active) == 3, timeout=60)
    threads.append(threading.Thread(target=ask, args=(3, long)))
    threads[-1].start()
    for thread in threads:
        thread.join(timeout=300)
    return answers, [*shorts, long]


@pytest.mark.parametrize("rows_of_budget", [12, 40])
def test_the_kv_pool_stays_within_its_budget(
    base_model_env, facts_archive, monkeypatch, rows_of_budget
):
    """Three short chats, then a long one (a 512-token bucket) joining them, 8 slots: with a
    budget of 12 rows of 256 tokens the long one waits while the three run (its pool and
    theirs would not fit together; once fewer run it may join them); with 40 the three rows
    are copied into a longer pool at once. Every pool, with the old one while rows are
    copied, fits the budget; every answer is as alone."""
    monkeypatch.setenv("COG_MAX_CONCURRENCY", "8")
    probe = ChatModel(str(facts_archive))
    budget = rows_of_budget * 256 * probe.plan.bytes_per_token
    monkeypatch.setenv("PREDICT_KV_CACHE_GIB", str(budget / 2**30))
    chat = ChatModel(str(facts_archive))
    peaks, copies = pool_peaks(monkeypatch)
    answers, requests = short_chats_then_a_long_one(chat)
    assert peaks and max(peaks) <= budget, (peaks, budget)
    kept = [keep for _, _, keep in copies]  # rows copied into a longer pool
    assert (3 in kept) == (rows_of_budget == 40), copies  # 8 x 256 -> 8 x 512, 3 rows kept
    assert answers == one_by_one(chat, requests)


def test_a_failing_request_fails_alone(chat, other_facts_archive, tmp_path, monkeypatch):
    """An adapter that fails to load on the scheduler thread: that request gets the error;
    the request decoding beside it answers in full; the server serves the next."""
    broken = tmp_path / "broken.tar"
    shutil.copy(other_facts_archive, broken)
    only_the_setup_adapter(chat)
    real_attach = chat._attach
    broken_name = src.serving.chat.adapter_name(chat.store.identity(str(broken)))

    def attach(name, files):
        if name == broken_name:
            raise RuntimeError("the disk went away")
        real_attach(name, files)

    monkeypatch.setattr(chat, "_attach", attach)
    requests = [
        request(FACTS[0][0], **LONG),
        request(FACTS[1][0], replicate_weights=str(broken)),
    ]
    answers = at_once(chat, requests)
    assert isinstance(answers[1], Exception) and "the disk went away" in str(answers[1])
    assert answers[0] == one_by_one(chat, requests[:1])[0]
    assert not chat.in_use and not chat.pending
    assert one_by_one(chat, [request(FACTS[2][0])]) == [FACTS[2][1]]


def test_an_adapter_loads_while_the_other_streams_decode(chat, other_facts_archive, monkeypatch):
    """A request whose adapter is not loaded: the load runs off the scheduler thread, and the
    stream decoding meanwhile keeps getting tokens (here: while the load is held up); then
    the newcomer answers as alone."""
    only_the_setup_adapter(chat)
    loading, go_on = threading.Event(), threading.Event()
    real_attach = chat._attach

    def slow_attach(name, files):
        loading.set()
        assert go_on.wait(timeout=60)
        real_attach(name, files)

    monkeypatch.setattr(chat, "_attach", slow_attach)
    tokens: list[str] = []
    first = request(FACTS[0][0], max_new_tokens=400, min_new_tokens=400)
    reader = threading.Thread(target=lambda: tokens.extend(chat.chat(first)))
    reader.start()
    wait_for(lambda: len(tokens) > 0, timeout=60)
    newcomer = request(FACTS[1][0], replicate_weights=str(other_facts_archive))
    answer: list[str] = []
    asker = threading.Thread(target=lambda: answer.extend(chat.chat(newcomer)))
    asker.start()
    assert loading.wait(timeout=60)
    during = len(tokens)
    wait_for(lambda: len(tokens) >= during + 20, timeout=60)  # decoding while it loads
    assert chat.loading is not None and not answer
    go_on.set()
    asker.join(timeout=120)
    reader.join(timeout=300)
    assert "".join(answer) == one_by_one(chat, [newcomer])[0]
    assert len(tokens) > during + 20 and chat.loading is None
    assert not chat.in_use and not chat.pending


def test_bad_slot_and_kv_settings_are_named(monkeypatch):
    """Read at setup: a wrong value fails it, naming the variable and the value."""
    from src.errors import UserInputError
    from src.serving.serving_plan import kv_budget_bytes, serving_slots

    for value in ("0", "-2", "four"):
        monkeypatch.setenv("COG_MAX_CONCURRENCY", value)
        with pytest.raises(
            UserInputError, match=f"COG_MAX_CONCURRENCY must be a positive integer, got '{value}'"
        ):
            serving_slots()
    monkeypatch.delenv("COG_MAX_CONCURRENCY")
    assert serving_slots() == 1  # unset: Cog runs one at a time
    for value in ("0", "-1", "lots", "nan"):
        monkeypatch.setenv("PREDICT_KV_CACHE_GIB", value)
        with pytest.raises(
            UserInputError, match=f"PREDICT_KV_CACHE_GIB must be a positive number, got '{value}'"
        ):
            kv_budget_bytes(torch.device("cpu"))
    monkeypatch.setenv("PREDICT_KV_CACHE_GIB", "0.5")
    assert kv_budget_bytes(torch.device("cpu")) == 2**29
