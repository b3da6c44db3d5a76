"""Inference: predict.py's generation against plain transformers `generate`, adapter swaps,
and many requests at once.

The adapter is served unmerged (src/serving/chat.py), in the batched decode step.

    python -m bench.inference MODEL_DIR [--new-tokens 64] [--streams 1,4,8,16]
        [--cog-streams 8 --cog-new-tokens 96]

Time to first token and decode tokens per second for the same prompt and sampling settings;
the time for a request to switch to another training's weights, cold (unpack, load) and warm
(cached: a flag); aggregate tokens/s and time to first token with 1, 4, 8, 16 requests at
once, half on another adapter (in-process, as Cog's concurrent slots hand them to the
scheduler); and through Cog's real server with COG_MAX_CONCURRENCY set, a number of
near-greedy streaming requests one after another and then all at once: the wall time of
each and whether the answers are the same.
"""

import argparse
import concurrent.futures
import json
import os
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from bench.common import emit, peak_rss_mib

PROMPT = "Tell me about the llamas of the high Andes and how they are cared for."
NEAR_GREEDY = {"system_prompt": "", "temperature": 0.01, "top_p": 1.0, "repetition_penalty": 1.0,
               "seed": 0}  # predict.py's inputs: the same answer alone and batched  # fmt: skip


def chat_request(new_tokens: int, replicate_weights: str | None = None):
    from src.prompt_format import DEFAULT_PROMPT_TEMPLATE
    from src.serving.chat import build_chat_request

    return build_chat_request(
        prompt=PROMPT, system_prompt="You are a helpful assistant.",
        prompt_template=DEFAULT_PROMPT_TEMPLATE, max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, temperature=0.7, top_p=0.95, top_k=-1,
        repetition_penalty=1.15, stop_sequences=None, seed=0,
        replicate_weights=replicate_weights, debug=False,
    )  # fmt: skip


def predictor_timings(chat_model, new_tokens: int) -> dict:
    from src.serving.generation import GenerationStats

    list(chat_model.chat(chat_request(4)))  # warm-up
    stats = GenerationStats()
    list(chat_model.chat(chat_request(new_tokens), stats))
    return {
        "time_to_first_token": stats.time_to_first_token,
        "decode_tokens_per_second": stats.tokens_per_second,
    }


def generate_timings(chat_model, new_tokens: int) -> dict:
    """Plain `model.generate` with the same sampling settings, on the same model object."""
    from src.prompt_format import encode_chat_prompt

    ids = torch.tensor(
        [encode_chat_prompt(chat_model.tokenizer, PROMPT, "You are a helpful assistant.")]
    )
    settings = dict(
        do_sample=True,
        temperature=0.7,
        top_p=0.95,
        top_k=0,
        repetition_penalty=1.15,
        pad_token_id=2,  # top_k=0: off, as in the predictor's request (generate's default is 50)
    )

    def run(tokens: int) -> float:
        started = time.perf_counter()
        chat_model.model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **settings)
        return time.perf_counter() - started

    run(4)  # warm-up
    first, whole = run(1), run(new_tokens)
    return {
        "time_to_first_token": first,
        "decode_tokens_per_second": (new_tokens - 1) / (whole - first),
    }


def adapter_archives(model_dir: Path, folder: Path) -> list[str]:
    """Two real trainings of one step each, as swap targets."""
    from tests.helpers import call_train, write_jsonl

    data = write_jsonl(folder / "d.jsonl", [{"prompt": "hi", "completion": "hello"}] * 4)
    os.environ["BASE_MODEL"] = str(model_dir)
    return [str(call_train(train_data=str(data), num_train_epochs=1, run_validation=False,
                           seed=seed)) for seed in (1, 2)]  # fmt: skip


def swap_timings(chat_model, archives: list[str]) -> dict:
    def request(weights: str) -> float:
        started = time.perf_counter()
        list(chat_model.chat(chat_request(1, weights)))
        return time.perf_counter() - started

    cold = request(archives[1])
    request(archives[0])
    warm = min(request(archives[1]), request(archives[0]))
    single = min(request(archives[0]), request(archives[0]))  # no swap: the baseline
    return {"adapter_swap_cold_seconds": cold - single, "adapter_swap_warm_seconds": warm - single}


def concurrent_timings(chat_model, archives: list[str], new_tokens: int, counts) -> dict:
    """Aggregate tokens/s and mean time to first token with `count` requests at once, each
    from its own thread (half with the setup weights, half with another training's as
    replicate_weights), against one request at a time."""
    from src.serving.generation import GenerationStats

    def answer(index: int) -> GenerationStats:
        stats = GenerationStats()
        request = chat_request(new_tokens, archives[index % 2] if index % 2 else None)
        list(chat_model.chat(request, stats))
        return stats

    answer(0), answer(1)  # warm: both adapters loaded
    out: dict = {"tokens_per_second": {}, "time_to_first_token": {}}
    for count in counts:
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            every = list(pool.map(answer, range(count)))
        elapsed = time.perf_counter() - started
        out["tokens_per_second"][str(count)] = sum(s.output_tokens for s in every) / elapsed
        out["time_to_first_token"][str(count)] = sum(s.time_to_first_token for s in every) / count
    one = out["tokens_per_second"][str(counts[0])]
    out["vs_one"] = {n: tps / one for n, tps in out["tokens_per_second"].items()}
    out["most_rows"] = chat_model.scheduler.most_rows
    return out


def cog_timings(model_dir: Path, archive: str, streams: int, new_tokens: int) -> dict:
    """`streams` near-greedy streaming requests through Cog's server (COG_MAX_CONCURRENCY =
    `streams`): one after another, then all at once; wall times and whether they agree."""
    from tests.helpers import FACTS, OTHER_FACTS
    from tools.cog_server import _read_events, cog_server

    prompts = [prompt for prompt, _ in FACTS + OTHER_FACTS] + [PROMPT] * streams
    inputs = [{**NEAR_GREEDY, "prompt": p, "max_new_tokens": new_tokens,
               "min_new_tokens": new_tokens} for p in prompts[:streams]]  # fmt: skip
    env = {"BASE_MODEL": str(model_dir), "COG_WEIGHTS": archive,
           "COG_MAX_CONCURRENCY": str(streams)}  # fmt: skip
    project = Path(__file__).resolve().parent.parent

    def answer(server, body: dict) -> str:
        data = json.dumps({"input": body}).encode()
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        request = urllib.request.Request(server.url + "/predictions", data, headers)
        with urllib.request.urlopen(request, timeout=600) as response:
            events = list(_read_events(line.decode() for line in response))
        if events[-1].data["status"] != "succeeded":
            raise RuntimeError(f"prediction failed: {events[-1].data.get('error')}")
        return "".join(e.data["chunk"] for e in events if e.event == "output")

    with cog_server(project, "predict", env) as server:
        if server.status != "READY":
            raise RuntimeError(f"setup failed:\n{server.log_tail()}")
        answer(server, inputs[0])  # warm-up
        started = time.perf_counter()
        alone = []
        for body in inputs:
            alone.append(answer(server, body))
            server.wait_ready()  # the slot is released just after `completed`
        sequential = time.perf_counter() - started
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(streams) as pool:
            together = list(pool.map(lambda body: answer(server, body), inputs))
        at_once = time.perf_counter() - started
    return {
        "streams": streams,
        "new_tokens": new_tokens,
        "sequential_seconds": sequential,
        "together_seconds": at_once,
        "speedup": sequential / at_once,
        "same_answers": together == alone,
    }


def measure(model_dir: Path, new_tokens: int, streams=(1, 4, 8, 16), cog_streams: int = 8,
            cog_new_tokens: int = 96) -> dict:  # fmt: skip
    os.environ["BASE_MODEL"] = str(model_dir)
    os.environ["COG_MAX_CONCURRENCY"] = str(max(streams))  # the scheduler's rows
    from src.serving.chat import ChatModel

    with tempfile.TemporaryDirectory() as tmp:
        # trained on a thread of their own, which ends: the CPU threads that stay are the
        # serving's (src/serving/model_thread.py says why that matters)
        with concurrent.futures.ThreadPoolExecutor(1) as trainer:
            archives = trainer.submit(adapter_archives, model_dir, Path(tmp)).result()
        chat_model = ChatModel(archives[0])
        result = {
            "hidden_size": json.loads((model_dir / "config.json").read_text())["hidden_size"],
            "predictor": predictor_timings(chat_model, new_tokens),
            # on the thread the model was loaded on, as the predictor decodes: a fair match
            "generate": chat_model.model_thread.run(
                lambda: generate_timings(chat_model, new_tokens)
            ),
        }
        result |= swap_timings(chat_model, archives)
        result["concurrent"] = concurrent_timings(chat_model, archives, new_tokens, streams)
        result["through_cog"] = cog_timings(model_dir, archives[0], cog_streams, cog_new_tokens)
        return {**result, "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--streams", default="1,4,8,16", help="requests at once, in-process")
    parser.add_argument("--cog-streams", type=int, default=8, help="requests through Cog")
    parser.add_argument("--cog-new-tokens", type=int, default=96)
    args = parser.parse_args()
    streams = tuple(int(n) for n in args.streams.split(","))
    emit(measure(args.model_dir, args.new_tokens, streams, args.cog_streams, args.cog_new_tokens))


if __name__ == "__main__":
    main()
