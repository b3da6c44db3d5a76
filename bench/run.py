"""All CPU benchmarks in one run: training throughput, data pipeline, inference.

    python -m bench.run            # the full run (about 15 minutes on 2 cores)
    python -m bench.run --smoke    # seconds: tiny sizes, so that the harness cannot rot (CI)

Each measurement runs in its own process, so that its peak memory is its own (the smoke run
stays in one process). Writes results.json and results.md into --out.
"""

import argparse
import json
import statistics
from pathlib import Path

from bench import census, inference, pipeline, training
from bench.common import (
    PROJECT_DIR,
    machine,
    model_config,
    peak_matmul_gflops,
    run_module,
    training_flops_per_token,
)
from tools.tiny_model import build_tiny_llama

PIPELINE_MEDIANS = (250, 40)  # tokens per row: the training set's spread, and chat-sized rows
FULL = {
    "train_model": "100m",
    "train_rows": 48,
    "chunk_size": 2048,
    "pipeline_rows": 1_000_000,
    "inference_models": ("tiny", "100m"),
    "new_tokens": 64,
    "streams": "1,4,8,16",
    "cog_streams": 8,
    "cog_new_tokens": 96,
}
SMOKE = {
    "train_model": "tiny",
    "train_rows": 8,
    "chunk_size": 256,
    "pipeline_rows": 400,
    "inference_models": ("tiny",),
    "new_tokens": 4,
    "streams": "1,2",
    "cog_streams": 2,
    "cog_new_tokens": 4,
}


def run(smoke: bool, out: Path) -> dict:
    sizes = SMOKE if smoke else FULL
    models = {
        size: model_dir(out, size) for size in {sizes["train_model"], *sizes["inference_models"]}
    }
    measure = _in_process if smoke else _in_subprocess
    results: dict = {
        "machine": machine(),
        "smoke": smoke,
        "peak_matmul_gflops": peak_matmul_gflops(),
    }
    train_dir = models[sizes["train_model"]]
    results["training"] = [
        measure(training, [stack, str(train_dir), "--rows", str(sizes["train_rows"]),
                           "--chunk-size", str(sizes["chunk_size"])],
                lambda stack=stack: training.measure(stack, train_dir, sizes["train_rows"],
                                                     sizes["chunk_size"]))
        for stack in training.STACKS
    ]  # fmt: skip
    add_ratios_and_mfu(results, model_config(train_dir))
    # The data stage runs each measurement in a fresh process of its own, smoke runs too:
    # its peak memory per token means nothing in a process that trained a model before.
    results["pipeline"] = [
        pipeline.measure(sizes["pipeline_rows"], median, runs=1 if smoke else 3)
        for median in PIPELINE_MEDIANS
    ]
    streams = tuple(int(n) for n in sizes["streams"].split(","))
    results["inference"] = {
        size: measure(inference, [str(models[size]), "--new-tokens", str(sizes["new_tokens"]),
                                  "--streams", sizes["streams"],
                                  "--cog-streams", str(sizes["cog_streams"]),
                                  "--cog-new-tokens", str(sizes["cog_new_tokens"])],
                      lambda size=size: inference.measure(models[size], sizes["new_tokens"],
                                                          streams, sizes["cog_streams"],
                                                          sizes["cog_new_tokens"]))
        for size in sizes["inference_models"]
    }  # fmt: skip
    # The operation census of a training pass as the GPU runs it (meta tensors: seconds)
    results["census"] = [
        census.measure("tiny" if smoke else "7b", 256 if smoke else 2048, fused=fused,
                       compiled=compiled)
        for fused, compiled in ((False, False), (True, False), (True, True))
    ]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    return results


def model_dir(out: Path, size: str) -> Path:
    folder = out / "models" / size
    if not (folder / "config.json").is_file():
        build_tiny_llama(folder, size=size)
    return folder


def _in_process(module, args: list[str], call) -> dict:
    return call()


def _in_subprocess(module, args: list[str], call) -> dict:
    return run_module(module.__name__, args)


def add_ratios_and_mfu(results: dict, config: dict) -> None:
    reference = next(r for r in results["training"] if r["stack"] == "reference")
    for result in results["training"]:
        flops = training_flops_per_token(config, result["mean_context"])
        achieved = result["tokens_per_second"] * flops / 1e9
        result["vs_reference"] = result["tokens_per_second"] / reference["tokens_per_second"]
        result["achieved_gflops"] = achieved
        result["mfu"] = achieved / results["peak_matmul_gflops"]


def markdown(results: dict) -> str:
    lines = [
        f"Machine: {results['machine']}; measured fp32 matmul peak "
        f"{results['peak_matmul_gflops']:.0f} GFLOP/s.",
        "",
        "| training stack | real tokens/s | vs reference | padding | MFU | peak RSS |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["training"]:
        lines.append(
            f"| {r['stack']} | {r['tokens_per_second']:.0f} | {r['vs_reference']:.2f}x | "
            f"{r['padding_share']:.0%} | {r['mfu']:.0%} | {r['peak_rss_mib'] / 1024:.1f} GiB |"
        )
    lines += [
        "",
        "| data stage (median row) | rows | tokens | file | stage s | tokenizer s | vs tokenizer "
        "| vs encoding alone | rows/s | peak memory per token | on disk per token |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in results["pipeline"]:
        lines.append(
            f"| {p['median_tokens']} tokens | {p['rows']:,} | {p['tokens']:,} | "
            f"{p['file_bytes'] / 2**30:.2f} GiB | {p['seconds']:.1f} | "
            f"{statistics.median(p['tokenizer_seconds']):.1f} | {p['vs_tokenizer']:.0%} | "
            f"{p['vs_encode_only']:.0%} | {p['rows_per_second']:,.0f} | "
            f"{p['peak_bytes_per_token']:.2f} B | {p['stored_bytes_per_token']:.2f} B |"
        )
    lines += [
        "",
        "| inference model | predictor TTFT | generate TTFT | predictor decode | generate decode "
        "| swap cold | swap warm |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for size, r in results["inference"].items():
        lines.append(
            f"| {size} (hidden {r['hidden_size']}) | "
            f"{r['predictor']['time_to_first_token'] * 1000:.0f} ms | "
            f"{r['generate']['time_to_first_token'] * 1000:.0f} ms | "
            f"{r['predictor']['decode_tokens_per_second']:.1f} tok/s | "
            f"{r['generate']['decode_tokens_per_second']:.1f} tok/s | "
            f"{r['adapter_swap_cold_seconds'] * 1000:.0f} ms | "
            f"{r['adapter_swap_warm_seconds'] * 1000:.0f} ms |"
        )
    lines += [
        "",
        "| inference model | requests at once | aggregate tokens/s | vs one | mean TTFT |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for size, r in results["inference"].items():
        c = r["concurrent"]
        for n, tps in c["tokens_per_second"].items():
            lines.append(
                f"| {size} | {n} | {tps:.1f} | {c['vs_one'][n]:.2f}x | "
                f"{c['time_to_first_token'][n] * 1000:.0f} ms |"
            )
    lines += [
        "",
        "| inference model | through Cog | one after another | all at once | speedup "
        "| same answers |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for size, r in results["inference"].items():
        g = r["through_cog"]
        lines.append(
            f"| {size} | {g['streams']} requests of {g['new_tokens']} tokens | "
            f"{g['sequential_seconds']:.1f} s | {g['together_seconds']:.1f} s | "
            f"{g['speedup']:.2f}x | {'yes' if g['same_answers'] else 'NO'} |"
        )
    first = results["census"][0]
    lines += [
        "",
        f"Operation census, {first['size']} shapes, one training pass of {first['tokens']} "
        f"tokens (bench/census.py):",
        "",
        "| LoRA forward | elementwise | part | kernels | matmul FLOPs/token "
        "| matmul bytes/token | other bytes/token |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for c, part in (
        (c, part) for c in results["census"] for part in ("decoder_layer", "embedding_head_loss")
    ):
        p = c[part]
        lines.append(
            f"| {c['lora_forward']} | {c['elementwise']} | {part.replace('_', ' ')} | "
            f"{p['kernels']} | "
            f"{p['matmul_flops_per_token'] / 1e6:,.1f} M | "
            f"{p['matmul_bytes_per_token'] / 1e3:,.0f} KB | "
            f"{p['other_bytes_per_token'] / 1e3:,.0f} KB |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=PROJECT_DIR / "bench" / "results")
    args = parser.parse_args()
    print(markdown(run(args.smoke, args.out)))


if __name__ == "__main__":
    main()
