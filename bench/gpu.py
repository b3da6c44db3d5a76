"""Llama-2-7B on one GPU (random weights built on the card, no download): training memory and
speed, packed attention kernels, and serving fidelity, drift and decode speed.

    python -m bench.gpu [--out DIR] [--sections env,matmul,attention,training,serving]

Each section appends to DIR/gpu_results.json as it finishes, so a run cut short keeps what it
measured. MFU counts 4 x matmul parameters per token for LoRA training (forward, and backward
through the frozen weights; 6 x with activation checkpointing, which repeats the forward) plus
causal attention, against the card's nominal dense bf16 peak and the matmul peak measured in
the same run.
"""

import argparse
import contextlib
import functools
import json
import random
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

LLAMA_2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32)  # fmt: skip
SMOKE_SHAPE = dict(
    hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4
)  # fmt: skip  (--smoke: the script itself, on a CPU)
SHAPE = dict(LLAMA_2_7B)
DEVICE = torch.device("cuda")
SCALE = 1  # token counts are divided by this in a smoke run
NOMINAL_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A40": 149.7}
A40_USABLE_GIB = 44.0
LORA = dict(rank=8, alpha=16, dropout=0.05)


# --------------------------------------------------------------------------- helpers


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def median_time(function: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median seconds of `function`, after a warm-up, the device synchronised around it."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        synchronize()
        started = time.perf_counter()
        function()
        synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def memory_allocated() -> int:
    return torch.cuda.memory_allocated() if DEVICE.type == "cuda" else 0


def reset_peak() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_allocated() -> int:
    return torch.cuda.max_memory_allocated() if DEVICE.type == "cuda" else 0


def peak_reserved() -> int:
    return torch.cuda.max_memory_reserved() if DEVICE.type == "cuda" else 0


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_llama_7b(attention: str, seed: int = 0):
    """Llama-2-7B with random weights, built in bf16 directly on the GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, **SHAPE)
    config._attn_implementation = attention
    torch.manual_seed(seed)
    with DEVICE, default_dtype(torch.bfloat16):
        model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model


def quantize_to_nf4(model) -> None:
    """Decoder linears to bitsandbytes NF4 with double quantisation, as load_base_model does."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                quantized = bnb.nn.Linear4bit(
                    linear.in_features, linear.out_features, bias=False,
                    compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True,
                    device="meta",
                )  # fmt: skip
                quantized.weight = bnb.nn.Params4bit(
                    linear.weight.data,
                    requires_grad=False,
                    quant_type="nf4",
                    compress_statistics=True,
                ).to(DEVICE)  # fmt: skip  (.to quantizes)
                setattr(parent, name, quantized)
    model.is_loaded_in_4bit = True  # what peft's prepare_model_for_kbit_training looks for
    reset_peak()


# --------------------------------------------------------------------------- sections


def section_env() -> dict:
    import importlib.metadata as metadata
    import inspect
    import platform

    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "triton"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        from torch.nn.attention.varlen import varlen_attn

        varlen = str(inspect.signature(varlen_attn))
    except ImportError as error:
        varlen = f"unavailable: {error}"
    env = {"versions": versions, "varlen_attn_signature": varlen, "device": str(DEVICE)}
    if DEVICE.type == "cuda":
        props = torch.cuda.get_device_properties(DEVICE)
        env |= {
            "device": torch.cuda.get_device_name(DEVICE),
            "memory_gib": gib(props.total_memory),
            "multiprocessors": props.multi_processor_count,
            "capability": list(torch.cuda.get_device_capability(DEVICE)),
            "cuda": torch.version.cuda,
        }
    return {"env": env}


def section_matmul() -> dict:
    size = 8192 // SCALE
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=DEVICE, dtype=dtype)
    b = torch.randn(size, size, device=DEVICE, dtype=dtype)
    seconds = median_time(lambda: a @ b, repeats=20, warmup=3)
    return {"matmul_tflops": 2 * size**3 / seconds / 1e12, "matmul_dtype": str(dtype)}


def random_partition(total: int, parts: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]


def section_attention() -> dict:
    """varlen kernel vs split loop vs dense block mask, 8,192 tokens, forward + backward."""
    from src.attention import PackedSegments, varlen_supported

    tokens, heads, dim = 8192 // SCALE, 32, 128
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    results = []
    for count in (4, 41, 205):
        count = min(count, tokens // 8)
        lengths = random_partition(tokens, count, seed=count)
        segments = PackedSegments.of(lengths, DEVICE)
        segment_ids = torch.repeat_interleave(torch.arange(count), torch.tensor(lengths))
        mask = torch.ones(tokens, tokens, dtype=torch.bool).tril()
        mask = (mask & (segment_ids[:, None] == segment_ids[None, :])).to(DEVICE)
        torch.manual_seed(count)
        inputs = [torch.randn(1, heads, tokens, dim, device=DEVICE, dtype=dtype) for _ in range(3)]
        grad_out = torch.randn(1, tokens, heads, dim, device=DEVICE, dtype=dtype)
        paths = _attention_paths(segments, mask, dim**-0.5, varlen_supported(inputs[0]))
        reference_grads = _attention_grads(paths["dense_mask"], inputs, grad_out, torch.float32)
        row: dict = {"segments": count, "tokens": tokens}
        for name, path in paths.items():
            grads = _attention_grads(path, inputs, grad_out, dtype)
            row[f"{name}_grad_rel_error"] = max(
                float((g - r).norm() / r.norm())
                for g, r in zip(grads, reference_grads, strict=True)
            )
            step = functools.partial(_attention_step, path, inputs, grad_out)
            row[f"{name}_fwd_bwd_ms"] = 1000 * median_time(step, repeats=10)
        if "varlen" in paths:
            row["varlen_speedup_vs_split"] = row["split_fwd_bwd_ms"] / row["varlen_fwd_bwd_ms"]
            row["varlen_speedup_vs_dense"] = row["dense_mask_fwd_bwd_ms"] / row["varlen_fwd_bwd_ms"]
        results.append(row)
        print(json.dumps(row), flush=True)
    return {"attention": results}


def _attention_paths(segments, mask: torch.Tensor, scale: float, varlen: bool) -> dict:
    from src.attention import _split, _varlen

    paths = {
        "split": lambda q, k, v: _split(q, k, v, segments.lengths, 0.0, scale, False),
        "dense_mask": lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale
        ).transpose(1, 2),
    }
    if varlen:
        paths["varlen"] = lambda q, k, v: _varlen(q, k, v, segments, scale)
    return paths


def _attention_step(path, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> None:
    leaves = [t.detach().requires_grad_() for t in inputs]
    path(*leaves).backward(grad_out)


def _attention_grads(path, inputs, grad_out, dtype) -> list[torch.Tensor]:
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    path(*leaves).backward(grad_out.to(dtype))
    return [t.grad.float() for t in leaves]


def training_cases() -> dict[str, list]:
    """Rows of one micro-batch per case: the documented defaults packed and not, a long row."""
    from bench.common import mixed_lengths, synthetic_examples
    from src.training.batching import Row, Segment, build_rows

    chunk = 2048 // SCALE
    examples = synthetic_examples(mixed_lengths(400, longest=chunk))
    packed, _ = build_rows(examples, pack=True, wrap=False, chunk_size=chunk)

    def rows_of(lengths: list[int]) -> list:
        examples = synthetic_examples([n // SCALE for n in lengths], seed=len(lengths))
        return [Row((Segment.of(e.tokens),)) for e in examples]

    return {
        "packed 4 x 2048": sorted(packed, key=len, reverse=True)[:4],
        "unpacked 4 rows up to 4096": rows_of([4096, 3072, 2048, 1024]),
        "long row 4096": rows_of([4096]),
    }


def measure_training(model, rows: list, checkpointing: bool, steps: int = 2) -> dict:
    """Optimizer steps on one micro-batch through this project's loss and backward."""
    from src.modeling import set_activation_checkpointing
    from src.training.batching import collate
    from src.training.loop import accumulate_gradients

    set_activation_checkpointing(model, checkpointing)  # add_lora prepared it, off
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    batch = collate(rows)
    reset_peak()
    before = memory_allocated()
    timings = []
    for _ in range(steps + 1):
        synchronize()
        started = time.perf_counter()
        accumulate_gradients(model, [batch], batch.num_targets, DEVICE)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        timings.append(time.perf_counter() - started)
    seconds = statistics.median(timings[1:])
    tokens = batch.num_real_tokens
    width, layers = SHAPE["hidden_size"], SHAPE["num_hidden_layers"]
    matmul_parameters = (
        layers * (4 * width**2 + 3 * width * SHAPE["intermediate_size"]) + width * 32000
    )
    causal_pairs = sum(n * n / 2 for n in batch.segment_lengths)
    attention_forward = 4 * width * layers * causal_pairs
    passes = 4 if checkpointing else 3  # attention: forward, backward (2x), recomputed forward
    flops = (6 if checkpointing else 4) * matmul_parameters * tokens + passes * attention_forward
    return {
        "checkpointing": checkpointing,
        "tokens": tokens,
        "segments": len(batch.segment_lengths),
        "seconds_per_step": seconds,
        "tokens_per_second": tokens / seconds,
        "tflops": flops / seconds / 1e12,
        "allocated_before_gib": gib(before),
        "peak_allocated_gib": gib(peak_allocated()),
        "peak_reserved_gib": gib(peak_reserved()),
    }


def section_training(peaks: dict) -> dict:
    from src.attention import NAME
    from src.modeling import add_lora

    cases = training_cases()
    runs = []
    for method in ("lora", "qlora"):
        model = build_llama_7b(NAME)
        if method == "qlora":
            quantize_to_nf4(model)
        model = add_lora(model, LORA["rank"], LORA["alpha"], LORA["dropout"], method == "qlora")
        fixed = gib(memory_allocated())
        print(f"{method}: model ready, {fixed:.1f} GiB allocated", flush=True)
        plans = [(method, case, ckpt) for case in cases for ckpt in (False, True)]
        if method == "qlora":  # the lever: norms, embeddings and head kept in bf16
            plans.append(("qlora, non-quantised in bf16", "packed 4 x 2048", True))
        for label, case, checkpointing in plans:
            if label == "qlora, non-quantised in bf16":
                for parameter in model.parameters():
                    if parameter.dtype == torch.float32 and not parameter.requires_grad:
                        parameter.data = parameter.data.to(torch.bfloat16)
            run = {"method": label, "case": case, "model_gib": fixed}
            try:
                run |= measure_training(model, cases[case], checkpointing)
                run |= _mfu(run["tflops"], peaks)
            except torch.cuda.OutOfMemoryError as error:
                run |= {"checkpointing": checkpointing, "error": f"out of memory: {error}"[:200]}
            reset_peak()
            runs.append(run)
            print(json.dumps(run), flush=True)
        del model
        reset_peak()
    return {"training": runs}


def _mfu(tflops: float, peaks: dict) -> dict:
    return {
        "mfu_nominal": tflops / peaks["nominal"] if peaks.get("nominal") else None,
        "mfu_measured": tflops / peaks["measured"] if peaks.get("measured") else None,
    }


def section_serving() -> dict:
    """Fidelity of served adapters in bf16 against the trained model in fp32; drift; decode."""
    from peft import LoraConfig, get_peft_model

    from src.modeling import LORA_TARGET_MODULES

    results: dict = {}
    model = build_llama_7b("sdpa")
    model.config.use_cache = True
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGET_MODULES, lora_dropout=0.0)
    model = get_peft_model(model, lora, adapter_name="a")
    model.add_adapter("b", lora)
    for index, name in enumerate(("a", "b")):  # a trained-looking delta: rms about 2e-4
        generator = torch.Generator(device=DEVICE).manual_seed(index)
        for module in model.modules():
            if hasattr(module, "lora_B") and name in module.lora_B:
                weight = module.lora_B[name].weight
                weight.data = 4e-3 * torch.randn(
                    weight.shape, device=DEVICE, generator=generator, dtype=weight.dtype
                )
    model.set_adapter("a")
    model.eval()
    targets = {n: m for n, m in model.named_modules() if hasattr(m, "lora_B")}
    first = next(iter(targets.values()))
    results["adapter_dtype"] = str(first.lora_B["a"].weight.dtype)
    results["base_dtype"] = str(first.base_layer.weight.dtype)
    deltas = [m.get_delta_weight("a").float() for m in list(targets.values())[:8]]
    results["delta_rms"] = float(
        torch.cat([d.detach().flatten() for d in deltas]).square().mean().sqrt()
    )
    prompts = torch.randint(3, 32000, (4, 128 // SCALE), generator=torch.Generator().manual_seed(0))
    prompts = prompts.to(DEVICE)

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(input_ids=p[None]).logits.float() for p in prompts])

    pristine = {n: m.base_layer.weight.detach().clone() for n, m in targets.items()}
    bf16_unmerged = logits()
    with torch.no_grad():  # the trained model in fp32: the same weights, upcast
        model.float()
        reference = logits()
        model.to(torch.bfloat16)
        for module in targets.values():
            for name in ("a", "b"):
                module.lora_A[name].float()
                module.lora_B[name].float()
    reset_peak()
    results["bound_bf16_unmerged_vs_fp32"] = float((bf16_unmerged - reference).abs().max())
    model.merge_adapter()
    results["merged_bf16_vs_fp32"] = float((logits() - reference).abs().max())
    model.unmerge_adapter()
    with torch.no_grad(), model.disable_adapter():  # merge in fp32 from pristine, cast once
        for name, module in targets.items():
            merged = pristine[name].float() + module.get_delta_weight("a").float()
            module.base_layer.weight.copy_(merged.to(torch.bfloat16))
        results["fp32_merge_cast_once_vs_fp32"] = float((logits() - reference).abs().max())
        for name, module in targets.items():
            module.base_layer.weight.copy_(pristine[name])
    print(json.dumps(results), flush=True)
    results |= _drift(model, targets, pristine)
    print(json.dumps(results), flush=True)
    results |= _decode(model, prompts[0, : 64 // SCALE])
    return {"serving": results}


def _drift(model, targets: dict, pristine: dict, swaps: int = 100) -> dict:
    """peft's merge/unmerge in bf16, alternating two adapters, against the loaded weights."""
    synchronize()
    started = time.perf_counter()
    for swap in range(swaps):
        model.set_adapter("a" if swap % 2 == 0 else "b")
        model.merge_adapter()
        model.unmerge_adapter()
    synchronize()
    per_swap = (time.perf_counter() - started) / swaps
    changed = total = 0
    worst = 0.0
    delta_rms = []
    with torch.no_grad():
        for name, module in targets.items():
            now, then = module.base_layer.weight, pristine[name]
            changed += int((now != then).sum())
            total += now.numel()
            worst = max(worst, float((now.float() - then.float()).abs().max()))
            delta_rms.append(float(module.get_delta_weight("a").float().square().mean().sqrt()))
            now.copy_(then)
    model.set_adapter("a")
    return {
        "drift_swaps": swaps,
        "drift_changed_share": changed / total,
        "drift_max_abs": worst,
        "drift_max_over_delta_rms": worst / statistics.mean(delta_rms),
        "peft_merge_unmerge_seconds": per_swap,
    }


def _decode(model, prompt: torch.Tensor, new_tokens: int = 128) -> dict:
    from src.serving.generation import SamplingSettings, sample_tokens

    new_tokens //= SCALE
    settings = SamplingSettings(max_new_tokens=new_tokens, min_new_tokens=new_tokens, seed=0)
    out: dict = {"decode_new_tokens": new_tokens, "prompt_tokens": prompt.numel()}
    for label in ("unmerged", "merged"):
        if label == "merged":
            model.merge_adapter()

        def own_loop() -> None:
            for _ in sample_tokens(model, prompt.tolist(), settings, eos_token_id=2):
                pass

        def generate(tokens: int = new_tokens) -> None:
            model.generate(
                input_ids=prompt[None], attention_mask=torch.ones_like(prompt[None]),
                max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True, temperature=0.7,
                top_p=0.95, repetition_penalty=1.15, pad_token_id=2,
            )  # fmt: skip

        seconds = median_time(own_loop, repeats=1, warmup=1)
        out[f"own_loop_{label}_tokens_per_second"] = new_tokens / seconds
        seconds = median_time(generate, repeats=1, warmup=1)
        out[f"generate_{label}_tokens_per_second"] = new_tokens / seconds
        if DEVICE.type == "cuda":
            try:
                out[f"cuda_graph_{label}_tokens_per_second"] = _graphed_decode(
                    model, prompt, new_tokens
                )
            except Exception as error:  # a probe: record why it could not run
                out[f"cuda_graph_{label}_error"] = "".join(traceback.format_exception(error))[
                    -1500:
                ]
        print(json.dumps(out), flush=True)
    model.unmerge_adapter()
    return out


def _graphed_decode(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Probe: greedy decode replaying one CUDA graph per token over a static KV cache."""
    from transformers import StaticCache

    config = model.config
    cache = StaticCache(config=config, max_cache_len=prompt.numel() + new_tokens + 8)
    with torch.no_grad():
        logits = model(input_ids=prompt[None], cache=cache, use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        position = torch.tensor([[prompt.numel()]], device=DEVICE)

        def step() -> torch.Tensor:
            return model(input_ids=token, position_ids=position, cache=cache, use_cache=True).logits

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graph_logits = step()

        def decode() -> None:
            for _ in range(new_tokens):
                graph.replay()
                token.copy_(graph_logits[:, -1].argmax(-1, keepdim=True))
                position.add_(1)
                int(token)  # the host sync a streaming loop makes per token

        return new_tokens / median_time(decode, repeats=1, warmup=0)


# --------------------------------------------------------------------------- main


def nominal_peak(device: str) -> float | None:
    for name, peak in NOMINAL_PEAK_TFLOPS.items():
        if name in device:
            return peak
    return None


def main() -> None:
    global DEVICE, SCALE
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--sections", default="env,matmul,attention,training,serving")
    parser.add_argument("--smoke", action="store_true", help="a tiny model: the script itself")
    args = parser.parse_args()
    if args.smoke:
        SHAPE.update(SMOKE_SHAPE)
        SCALE = 32
        DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_results.json"
    results: dict = {}
    device_name = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu"
    peaks = {"nominal": nominal_peak(device_name)}
    sections = {
        "env": section_env,
        "matmul": section_matmul,
        "attention": section_attention,
        "training": lambda: section_training(peaks),
        "serving": section_serving,
    }
    for name in args.sections.split(","):
        started = time.perf_counter()
        try:
            results |= sections[name]()
        except Exception as error:  # one failing section must not lose the others
            results[f"{name}_error"] = "".join(traceback.format_exception(error))[-3000:]
            print(results[f"{name}_error"], flush=True)
        results.setdefault("section_seconds", {})[name] = time.perf_counter() - started
        if "matmul_tflops" in results:
            peaks["measured"] = results["matmul_tflops"]
        path.write_text(json.dumps(results, indent=2))
        print(f"== {name} done in {results['section_seconds'][name]:.0f} s", flush=True)


if __name__ == "__main__":
    main()
