"""GPU training throughput of the Llama-2-7B architecture (random weights, no download).

    python -m bench.gpu [--out results.json] [--steps 3]

For LoRA in bf16 and QLoRA (NF4, double quantisation), chunk sizes 2048 and 4096, with and
without activation checkpointing: real tokens per second, model FLOPs utilisation (4 x matmul
parameters x tokens, plus attention; 6x with checkpointing, which repeats the forward) against
the card's dense bf16 peak measured in the same run, and peak GPU memory. Packed rows of
mixed-length synthetic examples go through this project's own loop (src.trainer).
"""

import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import mixed_lengths, synthetic_examples

LLAMA_2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    max_position_embeddings=4096,
)


def peak_bf16_tflops(size: int = 8192) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * 20 / (time.perf_counter() - started) / 1e12


def build_model(quantized: bool):
    """Llama-2-7B with random weights on the GPU; linear layers in NF4 for QLoRA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from src.modeling import attention_implementation, pick_placement

    config = LlamaConfig(**LLAMA_2_7B)
    config._attn_implementation = attention_implementation(pick_placement())
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    if quantized:
        quantize_decoder_linears(model)
    model.config.use_cache = False
    return model


def quantize_decoder_linears(model) -> None:
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                weight = bnb.nn.Params4bit(
                    linear.weight.data.cpu(),
                    requires_grad=False,
                    quant_type="nf4",
                    compress_statistics=True,
                )
                quantized = bnb.nn.Linear4bit(
                    linear.in_features,
                    linear.out_features,
                    bias=False,
                    compute_dtype=torch.bfloat16,
                    quant_type="nf4",
                )
                quantized.weight = weight
                setattr(parent, name, quantized.cuda())  # .cuda() quantizes
    torch.cuda.empty_cache()


def measure(method: str, chunk_size: int, checkpointing: bool, steps: int) -> dict:
    from src.batching import build_rows, collate
    from src.modeling import add_lora, enable_activation_checkpointing
    from src.trainer import accumulate_gradients

    torch.cuda.reset_peak_memory_stats()
    model = add_lora(build_model(method == "qlora"), 8, 16, 0.05, quantized=method == "qlora")
    if checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    examples = synthetic_examples(mixed_lengths(40 * chunk_size // 300))
    rows, _ = build_rows(examples, pack=True, wrap=False, chunk_size=chunk_size)
    rows = sorted(rows, key=len, reverse=True)[: steps + 1]  # the fullest rows
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    timings = []
    for row in rows:
        batch = collate([row])
        torch.cuda.synchronize()
        started = time.perf_counter()
        accumulate_gradients(model, [batch], batch.num_targets, torch.device("cuda"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        timings.append(
            (
                batch.num_real_tokens,
                time.perf_counter() - started,
                sum(len(s.input_ids) ** 2 for s in row.segments) / 2,
            )
        )
    timed = timings[1:]
    tokens, seconds = sum(t for t, _, _ in timed), sum(s for _, s, _ in timed)
    matmul = 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 4096 * 32000
    attention = 3 * 4 * 4096 * 32 * sum(a for _, _, a in timed)  # causal pairs x width x layers
    factor = 6 if checkpointing else 4
    del model, optimizer
    return {
        "method": method, "chunk_size": chunk_size, "activation_checkpointing": checkpointing,
        "tokens_per_second": tokens / seconds,
        "flops_per_second": (factor * matmul * tokens + attention * factor / 4) / seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("gpu_results.json"))
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    results = {
        "device": torch.cuda.get_device_name(),
        "peak_bf16_tflops": peak_bf16_tflops(),
        "runs": [],
    }
    print(f"{results['device']}: measured bf16 peak {results['peak_bf16_tflops']:.0f} TFLOP/s")
    for method in ("lora", "qlora"):
        for chunk_size in (2048, 4096):
            for checkpointing in (False, True):
                try:
                    run = measure(method, chunk_size, checkpointing, args.steps)
                    run["mfu"] = run["flops_per_second"] / 1e12 / results["peak_bf16_tflops"]
                except torch.cuda.OutOfMemoryError:
                    run = {
                        "method": method,
                        "chunk_size": chunk_size,
                        "activation_checkpointing": checkpointing,
                        "error": "out of memory",
                    }
                torch.cuda.empty_cache()
                results["runs"].append(run)
                print(json.dumps(run), flush=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
