"""The data stage at scale, against the raw speed of the tokenizer, each in its own process.

    python -m bench.pipeline --rows 1000000                 # the long-row shape, 3 runs each
    python -m bench.pipeline --rows 1000000 --median-tokens 40

The rows are prompt/completion pairs and text rows of made-up words, their lengths drawn from
the same log-normal spread as the training benchmark (median 250 tokens, about 360 a row), or
a short one (--median-tokens 40, chat-sized rows).

`stage` is the whole data stage as train() runs it (src/training/run.prepare_examples and
pack, with the documented defaults but chunk_size 4096, the context window, since the longest
generated rows pass 2,048 tokens): read, check, tokenize, split, pack. Its memory is the peak
RSS above the process's baseline, taken after imports and the tokenizer are loaded, before the
file is opened; per token, that is what the data costs.

`tokenizer` is the raw speed of the tokenizer as the project configures it
(src/prompt_format.encode_texts: the Rust tokenizer's batch encoding on all cores, and the ids
read out of it) on the very strings the stage encodes, in the same batches; the strings are
collected first and not timed. The encoding alone, without reading the ids out, is reported
beside it.

Runs alternate (stage, tokenizer, stage, ...), since this machine's timings drift by about
10%, and the median of each is compared.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import MEDIAN_TOKENS, emit, mixed_lengths, peak_rss_mib, run_module
from tools.tiny_model import TOKENIZER_FIXTURE

VOCABULARY = (
    "llama alpaca vicuna mountain river valley quick brown fox jumps over the lazy dog model "
    "train data token batch learning rate adapter weights chat answer question because "
    "however therefore Zorbia Quillton glimmerfruit teal eleven"
)
WORDS = VOCABULARY.split()
CHUNK_SIZE = 4096


def write_rows(path: Path, count: int, median: int, seed: int = 0) -> None:
    """Half text rows, half prompt/completion pairs; about `median` tokens for a median row."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    with path.open("w") as out:
        for number, length in enumerate(mixed_lengths(count, seed, median)):
            text = " ".join(words[rng.integers(0, len(words), max(2, length * 2 // 3))])
            if number % 2:
                row = {"text": text}
            else:
                cut = len(text) // 3
                row = {"prompt": text[:cut], "completion": text[cut:]}
            out.write(json.dumps(row) + "\n")


def rss_mib() -> float:
    """This process's resident memory now (peak_rss_mib is the peak so far)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


def run_stage(path: Path) -> dict:
    """The data stage, timed and its memory measured; in a fresh process."""
    from src.modeling import load_tokenizer
    from src.training.config import build_train_config
    from src.training.run import pack, prepare_examples
    from tests.helpers import train_defaults

    tokenizer = load_tokenizer(TOKENIZER_FIXTURE)
    config = build_train_config(**{**train_defaults(), "train_data": str(path),
                                   "chunk_size": CHUNK_SIZE, "pack_sequences": True})  # fmt: skip
    baseline = rss_mib()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as folder:
        started = time.perf_counter()
        data = prepare_examples(config, tokenizer, CHUNK_SIZE, Path(folder))
        prepared = time.perf_counter()
        rows, stats = pack(config, data)
        done = time.perf_counter()
        tokens = data.train.num_tokens + data.validation.num_tokens
        examples = len(data.train) + len(data.validation)
        stored = sum(f.stat().st_size for f in Path(folder).iterdir())
    peak = peak_rss_mib()
    return {
        "rows": examples,
        "tokens": tokens,
        "seconds": done - started,
        "prepare_seconds": prepared - started,
        "pack_seconds": done - prepared,
        "rows_per_second": examples / (done - started),
        "packed_rows": len(rows),
        "packing_efficiency": stats.efficiency,
        "baseline_rss_mib": baseline,
        "peak_rss_mib": peak,
        "bytes_per_token": (peak - baseline) * 2**20 / tokens,
        "stored_bytes_per_token": stored / tokens,
    }


def run_tokenizer(path: Path) -> dict:
    """encode_texts on the strings the stage encodes, batch by batch, timed; in a fresh
    process. The strings are gathered by the stage's own reader first, untimed."""
    from src.modeling import load_tokenizer
    from src.prompt_format import encode_texts
    from src.training.data import RowReader

    tokenizer = load_tokenizer(TOKENIZER_FIXTURE)
    reader = RowReader("train_data", path.stat().st_size)
    batches = [[p.text for p in batch.pieces] for batch in reader.batches(path)]
    started = time.perf_counter()
    tokens = sum(len(ids) for texts in batches for ids in encode_texts(tokenizer, texts))
    with_ids = time.perf_counter() - started
    backend = tokenizer.backend_tokenizer
    started = time.perf_counter()
    for texts in batches:
        backend.encode_batch_fast(texts, add_special_tokens=False)
    encode_only = time.perf_counter() - started
    return {"strings": sum(map(len, batches)), "text_tokens": tokens, "seconds": with_ids,
            "encode_only_seconds": encode_only}  # fmt: skip


def measure(count: int, median: int = MEDIAN_TOKENS, runs: int = 3, isolated: bool = True) -> dict:
    """`runs` of the stage and of the raw tokenizer, alternating, on one file of `count` rows.
    `isolated`: each in its own process (memory and timings its own); else in this one."""
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        path = Path(tmp) / "train.jsonl"
        write_rows(path, count, median)
        stages, raws = [], []
        for _ in range(runs):
            stages.append(_run("stage", path) if isolated else run_stage(path))
            raws.append(_run("tokenizer", path) if isolated else run_tokenizer(path))
        file_bytes = path.stat().st_size
    stage = min(stages, key=lambda s: abs(s["seconds"] - _median(stages, "seconds")))
    raw_seconds = _median(raws, "seconds")
    return {
        **stage,
        "median_tokens": median,
        "file_bytes": file_bytes,
        "runs": runs,
        "stage_seconds": [s["seconds"] for s in stages],
        "tokenizer_seconds": [r["seconds"] for r in raws],
        "tokenizer_encode_only_seconds": [r["encode_only_seconds"] for r in raws],
        "seconds": _median(stages, "seconds"),
        "peak_bytes_per_token": max(s["bytes_per_token"] for s in stages),
        "vs_tokenizer": raw_seconds / _median(stages, "seconds"),
        "vs_encode_only": _median(raws, "encode_only_seconds") / _median(stages, "seconds"),
    }


def _median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def _run(what: str, path: Path) -> dict:
    return run_module("bench.pipeline", ["--only", what, "--file", str(path)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--median-tokens", type=int, default=MEDIAN_TOKENS)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", choices=("stage", "tokenizer"), help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        emit((run_stage if args.only == "stage" else run_tokenizer)(args.file))
    else:
        emit(measure(args.rows, args.median_tokens, args.runs))


if __name__ == "__main__":
    main()
