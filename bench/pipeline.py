"""Data pipeline throughput, in its own process: read, check, tokenize and pack N rows.

    python -m bench.pipeline --rows 100000

The rows are prompt/completion pairs and text rows of made-up words, their lengths drawn from
the same log-normal spread as the training benchmark (median 250 tokens), or a short one
(--median-tokens 40, chat-sized rows). Memory is reported twice, after half
and after all of the rows, to show that it grows with the data and nothing else.
"""

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from bench.common import MEDIAN_TOKENS, emit, mixed_lengths, peak_rss_mib
from src.modeling import load_tokenizer
from src.training.batching import build_rows
from src.training.data import check_lengths, read_jsonl, tokenize_rows
from tools.tiny_model import TOKENIZER_FIXTURE

WORDS = [
    "llama",
    "alpaca",
    "vicuna",
    "mountain",
    "river",
    "valley",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "model",
    "train",
    "data",
    "token",
    "batch",
    "learning",
    "rate",
    "adapter",
    "weights",
    "chat",
    "answer",
    "question",
    "because",
    "however",
    "therefore",
    "Zorbia",
    "Quillton",
    "glimmerfruit",
    "teal",
    "eleven",
]


def write_rows(path: Path, count: int, median: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as out:
        for number, length in enumerate(mixed_lengths(count, seed, median)):
            words = " ".join(rng.choice(WORDS) for _ in range(max(2, length * 2 // 3)))
            if number % 2:
                row = {"text": words}
            else:
                cut = len(words) // 3
                row = {"prompt": words[:cut], "completion": words[cut:]}
            out.write(json.dumps(row) + "\n")


def run(path: Path, tokenizer, count: int) -> dict:
    started = time.perf_counter()
    rows = read_jsonl(path, "train_data")
    read = time.perf_counter()
    examples = tokenize_rows(rows, tokenizer)
    check_lengths(examples, 4096, "the context window")
    tokenized = time.perf_counter()
    packed, stats = build_rows(examples, pack=True, wrap=False, chunk_size=2048)
    done = time.perf_counter()
    return {
        "rows": count,
        "tokens": sum(len(e) for e in examples),
        "seconds": done - started,
        "rows_per_second": count / (done - started),
        "read_seconds": read - started,
        "tokenize_seconds": tokenized - read,
        "pack_seconds": done - tokenized,
        "packed_rows": len(packed),
        "packing_efficiency": stats.efficiency,
        "peak_rss_mib": peak_rss_mib(),
    }


def measure(count: int, median: int = MEDIAN_TOKENS) -> dict:
    tokenizer = load_tokenizer(TOKENIZER_FIXTURE)
    with tempfile.TemporaryDirectory() as tmp:
        half, full = Path(tmp) / "half.jsonl", Path(tmp) / "full.jsonl"
        write_rows(half, count // 2, median)
        write_rows(full, count, median)
        baseline = peak_rss_mib()
        first = run(half, tokenizer, count // 2)
        second = run(full, tokenizer, count)
    second["median_tokens"] = median
    second["peak_rss_mib_at"] = {
        "start": baseline,
        "half": first["peak_rss_mib"],
        "all": second["peak_rss_mib"],
    }
    return second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--median-tokens", type=int, default=MEDIAN_TOKENS)
    args = parser.parse_args()
    emit(measure(args.rows, args.median_tokens))


if __name__ == "__main__":
    main()
