"""What the benchmarks share: the synthetic data set, the model, the machine's peak, memory."""

import json
import math
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from src.training.examples import Examples, count_targets

PROJECT_DIR = Path(__file__).resolve().parent.parent
MIN_TOKENS, MAX_TOKENS = 20, 2000
MEDIAN_TOKENS, SIGMA = 250, 0.9  # log-normal: most rows short, a long tail to 2,000


def mixed_lengths(
    count: int, seed: int = 0, median: int = MEDIAN_TOKENS, longest: int = MAX_TOKENS
) -> list[int]:
    """Row lengths drawn log-normal, clipped to [20, longest] tokens: a realistic spread
    (packing without wrap takes rows of at most chunk_size tokens)."""
    rng = random.Random(seed)
    lengths = [round(rng.lognormvariate(math.log(median), SIGMA)) for _ in range(count)]
    return [min(longest, MAX_TOKENS, max(MIN_TOKENS, n)) for n in lengths]


def synthetic_examples(lengths: list[int], seed: int = 0) -> Examples:
    """Text rows of random tokens (BOS first, EOS last), every token trained but the BOS, as
    {"text": ...} rows are."""
    sizes = np.array(lengths, np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    ids = np.random.default_rng(seed).integers(3, 32000, int(offsets[-1]), dtype=np.int32)
    ids[offsets[:-1]], ids[offsets[1:] - 1] = 1, 2
    trained = np.ones(len(ids), bool)
    trained[offsets[:-1]] = False
    lines = np.arange(1, len(sizes) + 1, dtype=np.int64)
    return Examples("train_data", ids, trained, offsets, lines, count_targets(trained, sizes))


def peak_matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 matrix-multiply throughput: the best of a few square products."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def training_flops_per_token(config: dict, mean_context: float) -> float:
    """LoRA training FLOPs per token: 4 x matmul parameters (forward, and backward through the
    frozen weights) plus attention (forward 4 x context x width per layer, backward twice)."""
    width, layers = config["hidden_size"], config["num_hidden_layers"]
    per_layer = 4 * width * width + 3 * width * config["intermediate_size"]
    matmul_parameters = layers * per_layer + width * config["vocab_size"]  # + the LM head
    attention = 3 * 4 * mean_context * width * layers
    return 4 * matmul_parameters + attention


def peak_rss_mib() -> float:
    """This process's peak resident memory. Linux's VmHWM, not ru_maxrss: a process started
    by fork and exec inherits its parent's RSS at the fork into ru_maxrss (a benchmark started
    from pytest would report pytest's memory)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    import torch

    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def emit(result: dict) -> None:
    """A worker's result, on the last line of its stdout, for `run_module` to read."""
    print("RESULT " + json.dumps(result), flush=True)


def run_module(module: str, args: list[str]) -> dict:
    """`python -m module args` in a process of its own (its memory and timings its own);
    returns what it emitted."""
    command = [sys.executable, "-m", module, *args]
    done = subprocess.run(command, cwd=PROJECT_DIR, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(
            f"{' '.join(command)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return json.loads(lines[-1].removeprefix("RESULT "))


def model_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())
