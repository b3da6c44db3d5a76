"""Inference: predict.py's generation against plain transformers `generate`, and adapter swaps.

The adapter is served unmerged (src/serving/chat.py); its decode speed merged into the base
is measured alongside, as the option not taken.

    python -m bench.inference MODEL_DIR [--new-tokens 64]

Time to first token and decode tokens per second for the same prompt and sampling settings;
then the time for a request to switch to another training's weights, cold (unpack, load)
and warm (cached: a flag).
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from bench.common import emit, peak_rss_mib

PROMPT = "Tell me about the llamas of the high Andes and how they are cared for."


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


def measure(model_dir: Path, new_tokens: int) -> dict:
    os.environ["BASE_MODEL"] = str(model_dir)
    from src.serving.chat import ChatModel

    with tempfile.TemporaryDirectory() as tmp:
        archives = adapter_archives(model_dir, Path(tmp))
        chat_model = ChatModel(archives[0])
        result = {
            "hidden_size": json.loads((model_dir / "config.json").read_text())["hidden_size"],
            "predictor": predictor_timings(chat_model, new_tokens),
            "generate": generate_timings(chat_model, new_tokens),
        }
        chat_model.model.merge_adapter()  # the option not taken, for its decode speed
        result["predictor_merged"] = predictor_timings(chat_model, new_tokens)
        chat_model.model.unmerge_adapter()
        return {**result, **swap_timings(chat_model, archives), "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    emit(measure(args.model_dir, args.new_tokens))


if __name__ == "__main__":
    main()
