"""Chat through Cog's real prediction server (coglet) on 127.0.0.1, with predict.py's schema."""

import base64
import concurrent.futures
import json
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import decode_weights
from tests.helpers import (
    FACTS,
    FAST_LEARNING,
    OTHER_FACTS,
    call_train,
    serve_directory,
    wait_for,
    webhook_receiver,
    with_member,
    with_tensors,
    write_jsonl,
)
from tools.cog_server import CogServer, _read_events, cog_server
from tools.tiny_model import build_tiny_llama

PROJECT = Path(__file__).resolve().parent.parent
PROMPT, ANSWER = FACTS[0]
GREEDY = {
    "system_prompt": "",
    "temperature": 0.01,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "seed": 0,
    "max_new_tokens": 32,
}


@pytest.fixture(scope="module")
def shared_predict_server(
    tiny_model_dir, facts_archive, other_facts_archive, tmp_path_factory
) -> Iterator[tuple[CogServer, str]]:
    """COG_WEIGHTS as a local archive; another training served on loopback for swaps."""
    folder = tmp_path_factory.mktemp("other-weights")
    shutil.copy(other_facts_archive, folder / "other.tar")
    env = {"BASE_MODEL": str(tiny_model_dir), "COG_WEIGHTS": str(facts_archive)}
    with serve_directory(folder) as (url, _), cog_server(PROJECT, "predict", env) as server:
        assert server.status == "READY", server.log_tail()
        yield server, f"{url}/other.tar"


@pytest.fixture
def predict_server(shared_predict_server) -> tuple[CogServer, str]:
    shared_predict_server[0].wait_ready()
    return shared_predict_server


def answer(server: CogServer, **inputs) -> str:
    events = server.stream_prediction({**GREEDY, **inputs})
    assert events[0].event == "start" and events[-1].event == "completed"
    completed = events[-1].data
    assert completed["status"] == "succeeded", completed.get("error")
    chunks = [e.data["chunk"] for e in events if e.event == "output"]
    assert completed["metrics"]["output_token_count"] >= len(chunks) > 0
    assert "".join(chunks) == "".join(completed["output"])
    return "".join(chunks)


def test_streams_the_trained_answers_over_server_sent_events(predict_server):
    server, _ = predict_server
    events = server.stream_prediction({**GREEDY, "prompt": PROMPT})
    assert sum(e.event == "output" for e in events) > 3  # token by token, not one block
    for prompt, completion in FACTS:
        assert answer(server, prompt=prompt) == completion


def test_replicate_weights_swap_and_back(predict_server):
    server, other_url = predict_server
    assert answer(server, prompt=PROMPT, replicate_weights=other_url) == OTHER_FACTS[0][1]
    assert answer(server, prompt=PROMPT) == ANSWER
    assert answer(server, prompt=FACTS[2][0], replicate_weights=other_url) == OTHER_FACTS[2][1]


def test_the_predictors_defaults_prompt_the_adapter_as_it_was_trained(predict_server):
    """No system_prompt in the request (Cog sends none): the adapter, trained on rows
    without one, is prompted without one and answers as trained; the log says why."""
    server, _ = predict_server
    inputs = {k: v for k, v in GREEDY.items() if k != "system_prompt"}
    events = server.stream_prediction({**inputs, "prompt": PROMPT})
    completed = events[-1].data
    assert completed["status"] == "succeeded", completed.get("error")
    assert "".join(completed["output"]) == ANSWER
    assert "system prompt: none, as the adapter was trained" in completed["logs"]


def test_stop_sequences_are_not_emitted(predict_server):
    server, _ = predict_server
    assert answer(server, prompt=PROMPT, stop_sequences="Quill,xyz") == "The capital of Zorbia is "


def test_seeded_sampling_repeats(predict_server):
    server, _ = predict_server
    sampled = {**GREEDY, "temperature": 1.2, "top_k": 40, "seed": 5, "prompt": "Tell me more."}
    assert answer(server, **sampled) == answer(server, **sampled)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"temperature": 10}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": None}, "prompt"),
    ],
)
def test_invalid_input_is_422(predict_server, change, field):
    server, _ = predict_server
    status, body = server.post("/predictions", {"input": {"prompt": "hi", **change}})
    assert status == 422 and body["detail"][0]["loc"] == ["body", "input", field]


def test_bad_replicate_weights_fail_clearly_and_the_server_stays_ready(predict_server):
    server, other_url = predict_server
    _status, body = server.post(
        "/predictions",
        {
            "input": {
                "prompt": "hi",
                "replicate_weights": other_url.replace("other.tar", "nope.tar"),
            }
        },
    )
    assert body["status"] == "failed" and "HTTP Error 404" in body["error"]
    assert server.wait_ready() == "READY"
    assert answer(server, prompt=PROMPT) == ANSWER


def test_a_repetition_penalty_near_zero_is_refused_by_name(predict_server):
    """Dividing a seen token's logits by 1e-40 overflows them: refused, not a raw
    probability-tensor error; the server answers the next request."""
    server, _ = predict_server
    inputs = {**GREEDY, "prompt": PROMPT, "repetition_penalty": 1e-40}
    body = server.post("/predictions", {"input": inputs})[1]
    assert body["status"] == "failed"
    assert "repetition_penalty must be 0 or 1 (off) or at least 0.01" in body["error"]
    assert server.wait_ready() == "READY"
    assert answer(server, prompt=PROMPT) == ANSWER


def test_weights_that_fail_to_load_change_nothing_others_are_served(
    predict_server, facts_archive, tmp_path
):
    """All tensors valid but one (a wrong shape, a NaN): refused by name, and the server's
    own adapter, and the next swap, answer as before (the logits: tests/serving)."""
    server, other_url = predict_server
    before = [answer(server, prompt=p) for p, _ in FACTS]
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def wrong_shape(tensors):
        tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)

    def not_a_number(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = float("nan")

    for change, message in (
        (wrong_shape, "shape (16, 257)"),
        (not_a_number, "1 of its 4096 values are NaN or infinite"),
    ):
        bad = with_tensors(facts_archive, tmp_path / f"{change.__name__}.tar", change)
        body = server.post(
            "/predictions", {"input": {"prompt": PROMPT, "replicate_weights": str(bad)}}
        )[1]
        assert body["status"] == "failed" and f"{key}: {message}" in body["error"], body
        assert server.wait_ready() == "READY"
        assert [answer(server, prompt=p) for p, _ in FACTS] == before
    broken_members = [
        (
            "adapter_config.json",
            lambda d: d.replace(b'"r": 16', b'"r": "eight"'),
            "r must be a positive whole number",
        ),
        ("training_metadata.json", lambda d: b"[" + d + b"]", "metadata.json is a JSON list"),
        ("adapter_model.safetensors", lambda d: d[:-64], "is not a readable safetensors file"),
    ]
    for member, change, message in broken_members:
        bad = with_member(facts_archive, tmp_path / f"{member}.tar", member, change)
        inputs = {"prompt": PROMPT, "replicate_weights": str(bad)}
        body = server.post("/predictions", {"input": inputs})[1]
        assert body["status"] == "failed" and message in body["error"], body
        assert server.wait_ready() == "READY"  # the slot frees just after the response
        assert answer(server, prompt=PROMPT) == before[0]
    assert answer(server, prompt=PROMPT, replicate_weights=other_url) == OTHER_FACTS[0][1]


def test_full_loop_trained_over_http_served_from_a_url(tiny_model_dir, http_trained_weights):
    """Weights from the train server, downloaded by a fresh prediction server over HTTP."""
    with serve_directory(http_trained_weights.parent) as (url, requested):
        env = {
            "BASE_MODEL": str(tiny_model_dir),
            "COG_WEIGHTS": f"{url}/{http_trained_weights.name}",
        }
        with cog_server(PROJECT, "predict", env) as server:
            assert server.status == "READY", server.log_tail()
            for prompt, completion in FACTS:
                assert answer(server, prompt=prompt) == completion
    assert requested == [f"/{http_trained_weights.name}"]


NAMES = ["Zorb", "Quill", "Marta", "Teal"]


def name_conversation(name: str) -> dict:
    """The later answer needs the earlier turn: the same question, a different name."""
    return {
        "messages": [
            {"role": "user", "content": f"Hi, I am {name}."},
            {"role": "assistant", "content": f"Hello, {name}!"},
            {"role": "user", "content": "What is my name?"},
            {"role": "assistant", "content": f"Your name is {name}."},
        ]
    }


def test_a_conversation_file_trains_over_http_and_later_turns_are_answered(
    shared_train_server, shared_predict_server, tmp_path
):
    """Conversations train through Cog's train server; predict.py, given the history in
    Llama-2 chat form, answers the later turn as trained."""
    served = tmp_path / "served"
    served.mkdir()
    write_jsonl(served / "names.jsonl", [name_conversation(name) for name in NAMES] * 4)
    inputs = {**FAST_LEARNING, "num_train_epochs": 8}
    with serve_directory(served) as (url, _):
        shared_train_server.wait_ready()
        body = {"input": {"train_data": f"{url}/names.jsonl", **inputs}}
        status, result = shared_train_server.post("/trainings", body, timeout=300)
    assert status == 200 and result["status"] == "succeeded", result.get("error")
    assert "train: 16 rows" in result["logs"]
    weights = decode_weights(result["output"]["weights"], served / "names.tar")
    server, _ = shared_predict_server
    server.wait_ready()
    with serve_directory(weights.parent) as (url, _):
        for name in NAMES:
            history = (
                f"<s>[INST] Hi, I am {name}. [/INST] Hello, {name}! </s><s>[INST] What is my "
                f"name? [/INST]"
            )
            reply = answer(server, prompt=history, replicate_weights=f"{url}/names.tar")
            assert reply == f"Your name is {name}."


def test_weights_as_data_uri(tmp_path, facts_file):
    """A data: URI, as train() returns without an upload URL (micro model: env vars < 128 KiB)."""
    micro = build_tiny_llama(tmp_path / "micro", size="micro")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BASE_MODEL", str(micro))
        archive = call_train(
            train_data=str(facts_file), **{**FAST_LEARNING, "lora_rank": 2, "num_train_epochs": 1}
        )
    data_uri = "data:application/x-tar;base64," + base64.b64encode(archive.read_bytes()).decode()
    assert len(data_uri) < 128 * 1024
    env = {"BASE_MODEL": str(micro), "COG_WEIGHTS": data_uri}
    with cog_server(PROJECT, "predict", env) as server:
        assert server.status == "READY", server.log_tail()
        assert answer(server, prompt=PROMPT, max_new_tokens=4)
        assert "adapter data: URI loaded" in server.log_text()


def test_failing_setup_is_reported(tiny_model_dir, tmp_path):
    env = {"BASE_MODEL": str(tiny_model_dir), "COG_WEIGHTS": str(tmp_path / "missing.tar")}
    with cog_server(PROJECT, "predict", env) as server:
        assert server.setup_failed
        assert "weights: no such file" in server.log_text()


def test_setup_weights_with_an_infinite_tensor_fail_setup_naming_it(
    tiny_model_dir, facts_archive, tmp_path
):
    """Not READY and then failing every request: SETUP_FAILED, the log naming the tensor."""
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"

    def infinite(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key][2, 1] = float("inf")

    weights = with_tensors(facts_archive, tmp_path / "inf.tar", infinite)
    env = {"BASE_MODEL": str(tiny_model_dir), "COG_WEIGHTS": str(weights)}
    with cog_server(PROJECT, "predict", env) as server:
        assert server.setup_failed, server.log_tail()
        assert f"{key}: 1 of its 11264 values are NaN or infinite" in server.log_text()


SLOT_BACK_S = 10  # how soon a slot must come back (an endless answer takes this CPU a minute)


def _stream_answer(server: CogServer, inputs: dict) -> str:
    """One streaming prediction's text (without waiting for the server to be idle: other
    predictions are running)."""
    body = json.dumps({"input": {**GREEDY, **inputs}}).encode()
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    req = urllib.request.Request(server.url + "/predictions", body, headers, method="POST")
    deadline = time.monotonic() + SLOT_BACK_S
    while True:  # a slot is given back just after its prediction's `completed`
        try:
            with urllib.request.urlopen(req, timeout=120) as response:
                events = list(_read_events(line.decode() for line in response))
            break
        except urllib.error.HTTPError as error:
            if error.code != 409 or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    completed = events[-1].data
    assert completed["status"] == "succeeded", completed.get("error")
    return "".join(e.data["chunk"] for e in events if e.event == "output")


def _once_a_slot_is_free(send) -> tuple[int, object]:
    """`send()` again while Cog answers 409: a slot is given back just after the `completed`
    of the prediction that held it, and READY means one slot is free, not all."""
    deadline = time.monotonic() + SLOT_BACK_S
    while (answer := send())[0] == 409 and time.monotonic() < deadline:
        time.sleep(0.05)
    return answer


def _at_once(server: CogServer, requests: list[dict]) -> list:
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda inputs: _stream_answer(server, inputs), requests))


def test_concurrent_predictions_through_cog(tiny_model_dir, facts_archive, other_facts_archive):
    """COG_MAX_CONCURRENCY=3: three streams at once, each its own adapter and settings, each
    answered as alone; a fourth meanwhile is Cog's 409; a client that disconnects
    mid-stream, and a prediction canceled mid-stream, give their slot and row back (three at
    once run again after each); a request that fails beside a stream fails alone."""
    env = {
        "BASE_MODEL": str(tiny_model_dir),
        "COG_WEIGHTS": str(facts_archive),
        "COG_MAX_CONCURRENCY": "3",
    }
    long = {"max_new_tokens": 300, "min_new_tokens": 300}
    requests = [
        {"prompt": FACTS[0][0], **long},
        {"prompt": FACTS[1][0], "replicate_weights": str(other_facts_archive), **long},
        {"prompt": FACTS[2][0], "temperature": 0.8, "seed": 5, **long},
    ]
    with cog_server(PROJECT, "predict", env) as server:
        assert server.status == "READY", server.log_tail()
        assert "serving: 3 concurrent requests (COG_MAX_CONCURRENCY)" in server.log_text()
        alone = [_stream_answer(server, inputs) for inputs in requests]
        assert _at_once(server, requests) == alone
        assert server.wait_ready() == "READY"  # slots are given back just after `completed`
        # every slot taken (three answers of a minute, canceled after): a fourth is Cog's 409
        endless = {"max_new_tokens": 3000, "min_new_tokens": 3000}
        with webhook_receiver() as (hook, received):
            for index in range(3):
                body = {"input": {**GREEDY, "prompt": PROMPT, **endless}, "webhook": hook,
                        "webhook_events_filter": ["start", "completed"]}  # fmt: skip
                path, wait = f"/predictions/slot-{index}", {"Prefer": "respond-async"}
                status, _ = _once_a_slot_is_free(lambda: server.put(path, body, wait))  # noqa: B023
                assert status == 202
            wait_for(lambda: sum(h["status"] == "processing" for h in received) == 3, timeout=60)
            time.sleep(1)  # decoding (a cancel before Cog submits the coroutine is a failure)
            assert server.health() == "BUSY"
            status, _ = server.post("/predictions", {"input": {**GREEDY, "prompt": "hi"}})
            assert status == 409
            for index in range(3):
                assert server.post(f"/predictions/slot-{index}/cancel") == (200, {})
            wait_for(lambda: sum(h["status"] == "canceled" for h in received) == 3, timeout=30)
        assert server.wait_ready() == "READY"
        # a client gone mid-stream (its answer endless: only giving its slot back frees it)
        body = json.dumps({"input": {**GREEDY, "prompt": PROMPT, **endless}}).encode()
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        req = urllib.request.Request(server.url + "/predictions", body, headers, method="POST")
        with urllib.request.urlopen(req, timeout=60) as response:
            for line in response:
                if line.startswith(b"event: output"):
                    break
        assert server.wait_ready() == "READY"
        assert _at_once(server, [{"prompt": p} for p, _ in FACTS[:3]]) == [a for _, a in FACTS[:3]]
        assert server.wait_ready() == "READY"
        # beside a stream: a prediction canceled mid-answer, and one that fails; each alone
        with webhook_receiver() as (hook, received):
            endless = {"max_new_tokens": 3000, "min_new_tokens": 3000}  # until canceled
            body = {
                "input": {**GREEDY, "prompt": PROMPT, **endless},
                "webhook": hook,
                "webhook_events_filter": ["start", "completed"],
            }  # no webhook a token
            wait = {"Prefer": "respond-async"}
            status, _ = _once_a_slot_is_free(
                lambda: server.put("/predictions/to-cancel", body, wait)
            )
            assert status == 202
            wait_for(lambda: any(h["status"] == "processing" for h in received), timeout=60)
            time.sleep(1)  # mid-answer: 3,000 tokens take this machine a minute
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                streaming = pool.submit(_stream_answer, server, requests[1])
                missing = {**GREEDY, "prompt": "hi", "replicate_weights": "/no/such/weights.tar"}
                status, failed = _once_a_slot_is_free(
                    lambda: server.post("/predictions", {"input": missing})
                )
                assert status == 200 and failed["status"] == "failed"
                assert "/no/such/weights.tar" in failed["error"]
                assert server.post("/predictions/to-cancel/cancel") == (200, {})
                wait_for(lambda: any(h["status"] == "canceled" for h in received), timeout=30)
                assert streaming.result() == alone[1]
        assert server.wait_ready() == "READY"
        assert _at_once(server, [{"prompt": p} for p, _ in FACTS[:3]]) == [a for _, a in FACTS[:3]]
