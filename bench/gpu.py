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
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
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
    from tools.tiny_model import quantize_decoder_to_nf4

    quantize_decoder_to_nf4(model, torch.bfloat16, DEVICE)
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
        # (1, H, L, D) views of (1, L, H, D) memory, as the model's projections lay them out
        inputs = [
            torch.randn(1, tokens, heads, dim, device=DEVICE, dtype=dtype).transpose(1, 2)
            for _ in range(3)
        ]
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
    from src.attention import VarlenCall, _split, causal_varlen_kernel

    paths = {
        "split": lambda q, k, v: _split(q, k, v, segments.lengths, 0.0, scale, False),
        "dense_mask": lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale
        ).transpose(1, 2),
    }
    if varlen:
        kernel = causal_varlen_kernel()
        paths["varlen"] = lambda q, k, v: VarlenCall.of(q, k, v, segments, scale).run(kernel)
    return paths


def _attention_step(path, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> None:
    leaves = [t.detach().requires_grad_() for t in inputs]
    path(*leaves).backward(grad_out)


def _attention_grads(path, inputs, grad_out, dtype) -> list[torch.Tensor]:
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    path(*leaves).backward(grad_out.to(dtype))
    return [t.grad.float() for t in leaves]


def training_cases() -> dict[str, tuple]:
    """Rows of one micro-batch per case: the documented defaults packed and not, a long row."""
    from bench.common import mixed_lengths, synthetic_examples
    from src.training.batching import build_rows

    chunk = 2048 // SCALE
    examples = synthetic_examples(mixed_lengths(400, longest=chunk))
    packed, _ = build_rows(examples, pack=True, wrap=False, chunk_size=chunk)

    def rows_of(lengths: list[int]) -> tuple:
        examples = synthetic_examples([n // SCALE for n in lengths], seed=len(lengths))
        rows, _ = build_rows(examples, pack=False, wrap=False, chunk_size=0)
        return rows, np.arange(len(rows))

    return {
        "packed 4 x 2048": (packed, np.argsort(-packed.lengths, kind="stable")[:4]),
        "unpacked 4 rows up to 4096": rows_of([4096, 3072, 2048, 1024]),
        "long row 4096": rows_of([4096]),
    }


def llama_7b_config() -> dict:
    return {"vocab_size": 32000, "num_key_value_heads": SHAPE["num_attention_heads"], **SHAPE}


def longest_segment(case: tuple) -> int:
    rows, ids = case
    return int(rows.segment_lengths[rows.segments(ids)].max())


def training_step(model, case: tuple, plan) -> tuple[Callable[[], float], list]:
    """One optimizer step on one micro-batch as the loop runs it, as a function returning
    the loss: passes as planned, the gradient clipped, the loss and norm read once per
    step, AdamW (fused on a GPU). Also returns the passes' batches."""
    from src.training.batching import collate, forward_groups
    from src.training.loop import MAX_GRAD_NORM, accumulate_gradients

    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5, fused=DEVICE.type == "cuda")
    rows, ids = case
    batches = [collate(rows, group) for group in forward_groups(rows, ids, plan.tokens)]
    targets = sum(b.num_targets for b in batches)

    def step() -> float:
        loss = accumulate_gradients(model, batches, targets, DEVICE, plan)
        norm = torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
        loss, _ = torch.stack([loss, norm.float()]).tolist()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step, batches


def measure_training(model, case: tuple, plan, steps: int = 2) -> dict:
    """`steps` timed optimizer steps (after one untimed) of `training_step`."""
    step, batches = training_step(model, case, plan)
    reset_peak()
    timings = []
    for _ in range(steps + 1):
        synchronize()
        started = time.perf_counter()
        loss = step()
        synchronize()
        timings.append(time.perf_counter() - started)
    seconds = statistics.median(timings[1:])
    width, layers = SHAPE["hidden_size"], SHAPE["num_hidden_layers"]
    matmul = layers * (4 * width**2 + 3 * width * SHAPE["intermediate_size"]) + width * 32000
    flops = 0.0
    for batch in batches:  # a checkpointed pass repeats its forward: 6x instead of 4x
        checkpointed = plan.checkpoint(batch.num_real_tokens)
        attention = 4 * width * layers * sum(n * n / 2 for n in batch.segment_lengths)
        flops += (6 if checkpointed else 4) * matmul * batch.num_real_tokens
        flops += (4 if checkpointed else 3) * attention
    tokens = sum(b.num_real_tokens for b in batches)
    del step
    return {
        "tokens": tokens,
        "passes": len(batches),
        "checkpointed_passes": sum(plan.checkpoint(b.num_real_tokens) for b in batches),
        "loss": loss,
        "seconds_per_step": seconds,
        "tokens_per_second": tokens / seconds,
        "tflops": flops / seconds / 1e12,
        "peak_allocated_gib": gib(peak_allocated()),
        "peak_reserved_gib": gib(peak_reserved()),
    }


def section_training(peaks: dict) -> dict:
    """LoRA and QLoRA through the loop, planned for an A40's 44 GiB and for the whole card."""
    from src.attention import NAME
    from src.modeling import add_lora
    from src.training.fused_elementwise import choose_elementwise
    from src.training.fused_lora import choose_lora_forward
    from src.training.memory import GIB, MemoryModel, ModelShape, plan_forwards

    cases = training_cases()
    runs: list[dict] = []
    for method in ("lora", "qlora"):
        model = build_llama_7b(NAME)
        if method == "qlora":
            quantize_to_nf4(model)
        model = add_lora(model, LORA["rank"], LORA["alpha"], LORA["dropout"], method == "qlora")
        choose_lora_forward(model)  # the product's default: fused (TRAIN_FUSED_LORA)
        elementwise = choose_elementwise(model, DEVICE, 2048)  # TRAIN_COMPILE
        memory = MemoryModel(ModelShape.of(llama_7b_config()), method == "qlora", LORA["rank"])
        if DEVICE.type == "cuda":
            card = torch.cuda.mem_get_info()[0] + memory_allocated()
            budgets = {"A40 (44 GiB)": 44 * GIB, "whole card": card}
        else:  # --smoke on a CPU: the script itself, with budgets the tiny model fits
            card = 4 * GIB
            budgets = {"A40 (44 GiB)": 3 * GIB, "whole card": card}
        print(f"{method}: model ready, {gib(memory_allocated()):.1f} GiB allocated", flush=True)
        for budget_name, budget in budgets.items():
            for case, rows in cases.items():  # rows: (Rows, the row ids of one micro-batch)
                if budget_name == "whole card" and case == "long row 4096":
                    continue
                run = {"method": method, "budget": budget_name, "case": case, "levers": "default"}
                run["elementwise"] = elementwise
                try:
                    plan = plan_forwards(memory, budget, longest_segment(rows))
                    run |= {"plan": plan.describe(), "estimated_peak_gib": gib(plan.estimated_peak)}
                    run |= measure_training(model, rows, plan)
                    run |= _mfu(run["tflops"], peaks)
                    run["within_budget"] = run["peak_allocated_gib"] <= gib(budget)
                except Exception as error:  # an OOM or a refusal is a result too
                    run["error"] = f"{type(error).__name__}: {error}"[:300]
                reset_peak()
                runs.append(run)
                print(json.dumps(run), flush=True)
        if method == "lora":
            packed = cases["packed 4 x 2048"]
            plan = plan_forwards(memory, card, longest_segment(packed))
            profile = {"method": method, "case": "packed 4 x 2048", "budget": "whole card"}
            runs.append(
                profile | {"levers": "profile"} | _profile_training_step(model, packed, plan)
            )
            print(json.dumps(runs[-1]), flush=True)
        for lever in LEVERS:  # each switched off in turn, on one case
            runs.append(
                lever(model, cases["packed 4 x 2048"], memory, peaks, card) | {"method": method}
            )
            print(json.dumps(runs[-1]), flush=True)
        if method == "qlora":
            runs.append(_qlora_upcast(model, cases["packed 4 x 2048"], memory, peaks, card))
            print(json.dumps(runs[-1]), flush=True)
        del model
        reset_peak()
    return {"training": runs}


def _profile_training_step(model, case: tuple, plan, top: int = 12) -> dict:
    """One training step at the defaults under the torch profiler: the kernels it launches,
    the top ones by device time, and the gaps where the device waited for the host."""
    from torch.profiler import ProfilerActivity, profile

    step, _ = training_step(model, case, plan)
    step()  # warm: compiled, allocated
    synchronize()
    activity = ProfilerActivity.CUDA if DEVICE.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as profiler:
        step()
        synchronize()
    del step
    kind = "CUDA" if DEVICE.type == "cuda" else "CPU"
    kernels = sorted(
        (
            e
            for e in profiler.events()
            if e.device_type.name == kind and e.time_range.elapsed_us() >= 0
        ),
        key=lambda e: e.time_range.start,
    )
    if not kernels:
        return {"profile_error": "no kernels recorded"}
    busy_us = sum(e.time_range.elapsed_us() for e in kernels)
    span_us = kernels[-1].time_range.end - kernels[0].time_range.start
    gaps, end = [], kernels[0].time_range.end
    for event in kernels[1:]:
        if event.time_range.start > end:
            gaps.append(event.time_range.start - end)
        end = max(end, event.time_range.end)
    by_name: dict[str, list[float]] = {}
    for event in kernels:
        by_name.setdefault(event.name, []).append(event.time_range.elapsed_us())
    ranked = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:top]
    return {
        "step_kernels": len(kernels),
        "step_span_ms": span_us / 1000,
        "kernel_busy_ms": busy_us / 1000,
        "host_gap_ms": sum(gaps) / 1000,
        "host_gaps_over_50us": sum(g > 50 for g in gaps),
        "top_kernels": [
            {
                "name": name[:120],
                "calls": len(times),
                "ms": sum(times) / 1000,
                "share": sum(times) / busy_us,
            }
            for name, times in ranked
        ],
    }


def _lever_off(lever: str, off, on, model, rows: tuple, memory, peaks: dict, budget: int) -> dict:
    """The packed case on the whole card with one lever switched off (`off(model)` returns
    the memory model to plan with), then on again (`on(model)`)."""
    from src.training.memory import plan_forwards

    run = {"levers": f"{lever} off", "case": "packed 4 x 2048", "budget": "whole card"}
    try:
        memory = off(model, memory)
        plan = plan_forwards(memory, budget, longest_segment(rows))
        run |= measure_training(model, rows, plan) | {"plan": plan.describe()}
        run |= _mfu(run["tflops"], peaks)
    except Exception as error:
        run["error"] = f"{type(error).__name__}: {error}"[:300]
    finally:
        on(model)
        reset_peak()
    return run


def _fused_lora_off(model, rows: tuple, memory, peaks: dict, budget: int) -> dict:
    """The fused LoRA forward's lever: the same case through peft's own forward."""
    import dataclasses

    from src.training.fused_lora import install_fused_lora, remove_fused_lora

    def off(model, memory):
        remove_fused_lora(model)
        return dataclasses.replace(memory, fused_lora=False)  # peft's forward keeps more

    return _lever_off("fused LoRA", off, install_fused_lora, model, rows, memory, peaks, budget)


def _compiled_elementwise_off(model, rows: tuple, memory, peaks: dict, budget: int) -> dict:
    """The compiled elementwise lever: transformers' eager decoder layers."""
    from src.training.fused_elementwise import choose_elementwise, remove_elementwise

    def off(model, memory):
        remove_elementwise(model)
        return memory  # measured through eager layers: the same plan

    def on(model):
        choose_elementwise(model, DEVICE, 2048)

    return _lever_off("compiled elementwise", off, on, model, rows, memory, peaks, budget)


def _fused_loss_off(model, rows: tuple, memory, peaks: dict, budget: int) -> dict:
    """The fused loss's lever: autograd's cross-entropy, chunk by chunk."""
    import dataclasses
    import os

    def off(model, memory):
        os.environ["TRAIN_FUSED_LOSS"] = "0"
        return dataclasses.replace(memory, fused_loss=False)  # its log-softmax is kept

    def on(model):
        os.environ.pop("TRAIN_FUSED_LOSS", None)

    return _lever_off("fused loss", off, on, model, rows, memory, peaks, budget)


LEVERS = (_fused_lora_off, _compiled_elementwise_off, _fused_loss_off)


def _qlora_upcast(model, rows: tuple, memory, peaks: dict, budget: int) -> dict:
    """peft's prepare_model_for_kbit_training (fp32 embeddings, norms, head) against ours."""
    from peft import prepare_model_for_kbit_training

    from src.training.batching import collate
    from src.training.loop import supervised_loss_sum
    from src.training.memory import plan_forwards

    batch = collate(rows[0], rows[0].segments(rows[1]))
    with torch.no_grad():
        ours = supervised_loss_sum(model.eval(), batch, DEVICE).item() / batch.num_targets
        prepare_model_for_kbit_training(model.get_base_model(), use_gradient_checkpointing=False)
        for name, parameter in model.named_parameters():  # prepare froze everything
            parameter.requires_grad_("lora_" in name)
        upcast = supervised_loss_sum(model.eval(), batch, DEVICE).item() / batch.num_targets
    run = {"method": "qlora", "levers": "peft's fp32 upcast", "case": "packed 4 x 2048"}
    run["budget"] = "whole card"
    run |= {"loss_bf16_parts": ours, "loss_fp32_parts": upcast}
    run["loss_relative_difference"] = abs(ours - upcast) / abs(upcast)
    try:
        plan = plan_forwards(memory, budget, longest_segment(rows))  # planned as bf16 parts
        run |= measure_training(model, rows, plan) | {"plan": plan.describe()}
        run |= _mfu(run["tflops"], peaks)
    except Exception as error:
        run["error"] = f"{type(error).__name__}: {error}"[:300]
    return run


def _mfu(tflops: float, peaks: dict) -> dict:
    return {
        "mfu_nominal": tflops / peaks["nominal"] if peaks.get("nominal") else None,
        "mfu_measured": tflops / peaks["measured"] if peaks.get("measured") else None,
    }


def section_bandwidth() -> dict:
    size = 4 * 2**30 // SCALE**2
    source = torch.empty(size, dtype=torch.uint8, device=DEVICE)
    target = torch.empty_like(source)
    seconds = median_time(lambda: target.copy_(source), repeats=10)
    return {"copy_bandwidth_gbps": 2 * size / seconds / 1e9}  # bytes read and written


# --------------------------------------------------------------------------- serving


def section_serving(method: str = "lora") -> dict:
    """The product's predictor (src/serving/chat.py) on a saved Llama-2-7B: setup, fidelity of
    the served adapter, drift over 100 swaps, decode speed; merging alongside, as the option
    not taken. For QLoRA weights (served on the 4-bit base): setup and decode."""
    import os
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="llama7b-"))
    results: dict = {}
    started = time.perf_counter()
    model_dir, archives = write_model_and_adapters(folder, method)
    results["write_model_seconds"] = time.perf_counter() - started
    os.environ["BASE_MODEL"] = str(model_dir)
    os.environ["COG_MAX_CONCURRENCY"] = "32"  # the batched measurement's most streams
    from src.serving.chat import ChatModel

    started = time.perf_counter()
    chat = ChatModel(str(archives[0]))
    synchronize()
    results["setup_seconds"] = time.perf_counter() - started
    results["base_gib"] = gib(memory_allocated())
    if method == "lora":
        results |= _fidelity(chat, model_dir, archives)
        print(json.dumps(results), flush=True)
    results |= _decode(chat, archives)
    print(json.dumps(results), flush=True)
    if method == "lora":
        results |= _batched(chat, archives)
        print(json.dumps(results), flush=True)
    return {f"serving_{method}": results}


def write_model_and_adapters(folder: Path, method: str = "lora") -> tuple[Path, list[Path]]:
    """Llama-2-7B with random weights, saved as a Hugging Face folder with the Llama-2
    tokenizer, and two training archives of this project's format with random adapters."""
    import shutil

    from peft import LoraConfig, get_peft_model

    from src.artifact import FORMAT_VERSION, base_model_fingerprint, plot_losses, write_archive
    from src.modeling import LORA_TARGET_MODULES
    from tools.tiny_model import TOKENIZER_FIXTURE

    model_dir = folder / "model"
    model = build_llama_7b("sdpa")
    model.config.bos_token_id, model.config.eos_token_id = 1, 2
    model.save_pretrained(model_dir, safe_serialization=True)
    for item in TOKENIZER_FIXTURE.iterdir():
        shutil.copy(item, model_dir / item.name)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGET_MODULES, lora_dropout=0.0)
    archives = []
    peft_model = get_peft_model(model, lora)
    for index in range(2):
        torch.manual_seed(100 + index)
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # a trained-looking delta: rms about 2e-4
                torch.nn.init.normal_(parameter, std=4e-3)
        adapter_dir = folder / f"adapter{index}"
        peft_model.save_pretrained(adapter_dir, safe_serialization=True)
        metadata = {
            "format": FORMAT_VERSION, "peft_method": method, "inputs": {},
            "base_model": {"source": str(model_dir), **base_model_fingerprint(model_dir)},
        }  # fmt: skip
        curve = plot_losses([], [], folder / f"curve{index}.png")
        archives.append(write_archive(adapter_dir, metadata, curve, folder / f"w{index}.tar"))
    del model, peft_model
    reset_peak()
    return model_dir, archives


def _fidelity(chat, model_dir: Path, archives: list[Path]) -> dict:
    from peft import PeftModel

    from src.modeling import Placement, load_base_model
    from src.prompt_format import encode_chat_prompt

    prompts = [
        "Tell me about the llamas of the high Andes.", "What is the capital of Zorbia?",
        "Write a haiku about GPUs.", "Explain LoRA in one sentence.",
    ]  # fmt: skip
    ids = [encode_chat_prompt(chat.tokenizer, p) for p in prompts]

    def logits(model) -> torch.Tensor:  # a reference model run plainly
        with torch.inference_mode():
            rows = [model(input_ids=torch.tensor([i], device=DEVICE), logits_to_keep=1).logits
                    for i in ids]  # fmt: skip
        return torch.cat([r[:, -1] for r in rows]).float()

    def served_logits(weights: str | None = None) -> torch.Tensor:  # as predict.py serves
        return torch.cat([chat.first_token_logits(_request(p, 1, weights, system="", greedy=True))
                          for p in prompts]).float()  # fmt: skip

    folder = chat.store.unpack(str(archives[0])).folder
    served = served_logits()
    trained_bf16 = PeftModel.from_pretrained(
        load_base_model(model_dir, False, Placement(DEVICE, torch.bfloat16), "sdpa"), folder
    ).eval()
    in_bf16 = logits(trained_bf16)
    reference_model = PeftModel.from_pretrained(
        load_base_model(model_dir, False, Placement(DEVICE, torch.float32), "sdpa"), folder
    ).eval()
    reference = logits(reference_model)
    del reference_model
    reset_peak()
    results = {
        "bound_trained_bf16_vs_fp32": float((in_bf16 - reference).abs().max()),
        "served_vs_fp32": float((served - reference).abs().max()),
    }
    # The chosen method: 100 swaps, the base compared bit for bit with a fresh load.
    first = served
    started = time.perf_counter()
    for swap in range(100):  # requests alternating replicate_weights
        other = archives[1] if swap % 2 == 0 else archives[0]
        chat.first_token_logits(_request(prompts[0], 1, str(other)))
    synchronize()
    results["swap_seconds"] = (time.perf_counter() - started) / 100
    pristine = trained_bf16.get_base_model().state_dict()
    now = chat.model.get_base_model().state_dict()
    results["base_bit_identical_after_100_swaps"] = all(
        torch.equal(tensor, now[name]) for name, tensor in pristine.items() if name in now
    )
    results["logits_equal_after_100_swaps"] = bool(torch.equal(served_logits(), first))
    # The option not taken: peft's merge in bf16, then 100 unmerge/merge swaps.
    trained_bf16.merge_adapter()
    results["merged_bf16_vs_fp32"] = float((logits(trained_bf16) - reference).abs().max())
    trained_bf16.unmerge_adapter()
    fresh = load_base_model(model_dir, False, Placement(DEVICE, torch.bfloat16), "sdpa")
    trained_bf16.load_adapter(str(chat.store.unpack(str(archives[1])).folder), "other")
    for swap in range(100):
        trained_bf16.set_adapter("other" if swap % 2 == 0 else "default")
        trained_bf16.merge_adapter()
        trained_bf16.unmerge_adapter()
    drifted = trained_bf16.get_base_model().state_dict()
    changed = total = 0
    for name, tensor in fresh.state_dict().items():
        key = next(
            (k for k in (name, name.replace(".weight", ".base_layer.weight")) if k in drifted), None
        )
        if key is not None:
            changed += int((drifted[key] != tensor).sum())
            total += tensor.numel()
    results["merge_unmerge_changed_share_after_100_swaps"] = changed / max(total, 1)
    del trained_bf16, fresh
    reset_peak()
    return results


PROMPT = "Tell me about the llamas of the high Andes and how they are cared for."
SYSTEM = "You are a helpful assistant."


def _request(
    prompt: str,
    new_tokens: int,
    weights: str | None = None,
    system: str | None = SYSTEM,
    greedy: bool = False,
    seed: int = 0,
):
    """predict.py's inputs: its default sampling settings (near-greedy if `greedy`), exactly
    `new_tokens` new tokens."""
    from src.prompt_format import DEFAULT_PROMPT_TEMPLATE
    from src.serving.chat import build_chat_request

    return build_chat_request(
        prompt=prompt, system_prompt=system, prompt_template=DEFAULT_PROMPT_TEMPLATE,
        max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        temperature=0.01 if greedy else 0.7, top_p=1.0 if greedy else 0.95, top_k=-1,
        repetition_penalty=1.0 if greedy else 1.15, stop_sequences=None, seed=seed,
        replicate_weights=weights, debug=False,
    )  # fmt: skip


def _decode(chat, archives: list[Path], new_tokens: int = 128) -> dict:
    """predict.py's path (CUDA graphs) against `generate` on the same model, same settings."""
    from src.prompt_format import encode_chat_prompt
    from src.serving.generation import GenerationStats

    new_tokens //= SCALE

    def run(weights: str | None = None):
        stats = GenerationStats()
        started = time.perf_counter()
        for _ in chat.chat(_request(PROMPT, new_tokens, weights), stats):
            pass
        return stats, time.perf_counter() - started

    out: dict = {"decode_new_tokens": new_tokens}
    out["first_request_seconds"] = run()[1]  # captures the graph of this adapter and bucket
    stats, _ = run()
    out["predictor_ttft_seconds"] = stats.time_to_first_token
    out["predictor_tokens_per_second"] = stats.tokens_per_second
    out["swap_first_request_seconds"] = run(str(archives[1]))[1]
    out["predictor_other_adapter_tokens_per_second"] = run(str(archives[1]))[0].tokens_per_second
    out["predictor_base_tokens_per_second"] = _base_decode(chat, run)
    out["graphs_captured"] = chat.scheduler.decoder.captures
    ids = torch.tensor([encode_chat_prompt(chat.tokenizer, PROMPT, SYSTEM)], device=DEVICE)

    def generate(tokens: int) -> float:
        started = time.perf_counter()
        chat.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
            min_new_tokens=tokens, do_sample=True, temperature=0.7, top_p=0.95, top_k=0,
            repetition_penalty=1.15, pad_token_id=2,
        )  # fmt: skip
        synchronize()
        return time.perf_counter() - started

    generate(4)
    first, whole = generate(1), generate(new_tokens)
    out["generate_ttft_seconds"] = first
    out["generate_tokens_per_second"] = (new_tokens - 1) / (whole - first)
    weight_bytes = sum(p.numel() * p.element_size() for p in chat.model.parameters())
    out["bytes_read_per_token_gb"] = weight_bytes / 1e9
    if DEVICE.type == "cuda":
        out |= _profile_step(chat)
    return out


def _base_decode(chat, run) -> float:
    setup, chat.setup_name = chat.setup_name, None  # requests without weights: the plain base
    try:
        run()
        return run()[0].tokens_per_second
    finally:
        chat.setup_name = setup


def _profile_step(chat) -> dict:
    """One eager decode step of one row under the profiler: kernels and their device time."""
    from torch.profiler import ProfilerActivity, profile

    from bench.decode_census import one_row
    from src.prompt_format import encode_chat_prompt
    from src.serving.batch_step import decode_step

    ids = encode_chat_prompt(chat.tokenizer, PROMPT)
    stack, pool, rows = one_row(chat.model, ids)
    eos = chat.tokenizer.eos_token_id

    def step() -> None:
        with torch.inference_mode():
            decode_step(chat.model, stack, pool, rows.first(1), 256, eos, shortcuts=False)

    step()
    synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        step()
        synchronize()
    kernels = [e for e in profiler.events() if e.device_type.name == "CUDA"]
    return {
        "eager_step_kernels": len(kernels),
        "eager_step_kernel_ms": sum(e.device_time_total for e in kernels) / 1000,
    }


def _batched(chat, archives: list[Path], streams=(1, 4, 8, 16, 32), new_tokens: int = 128) -> dict:
    """Concurrent requests as predict.py serves them (one scheduler, one batched step): half
    with the setup adapter, half with another as replicate_weights; aggregate tokens/s and
    time to first token by the number of streams; and how often near-greedy answers differ
    between alone and in a batch of 16 (bf16 rounds a batched matmul differently)."""
    from concurrent.futures import ThreadPoolExecutor

    from src.serving.generation import GenerationStats

    new_tokens //= SCALE
    weights = [None, str(archives[1])]

    def answer(index: int, greedy: bool = False) -> tuple[str, GenerationStats]:
        stats = GenerationStats()
        request = _request(PROMPT if greedy else f"{PROMPT} ({index})", new_tokens,
                           weights[index % 2], greedy=greedy, seed=index)  # fmt: skip
        return "".join(chat.chat(request, stats)), stats

    answer(0), answer(1)  # warm: both adapters loaded
    tokens_per_second, ttft = {}, {}
    for count in (s for s in streams if s <= chat.scheduler.max_rows):
        started = time.perf_counter()
        with ThreadPoolExecutor(count) as pool:
            results = list(pool.map(answer, range(count)))
        elapsed = time.perf_counter() - started
        tokens_per_second[str(count)] = sum(s.output_tokens for _, s in results) / elapsed
        ttft[str(count)] = sum(s.time_to_first_token for _, s in results) / count
        print(json.dumps({"batched_tokens_per_second": tokens_per_second}), flush=True)
    alone = [answer(i, greedy=True)[0] for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda i: answer(i, greedy=True)[0], range(16)))
    return {
        "batched_tokens_per_second": tokens_per_second,
        "batched_ttft_seconds": ttft,
        "batched_most_rows": chat.scheduler.most_rows,
        "batched_greedy_answers_identical_share": sum(
            a == b for a, b in zip(alone, together, strict=True)
        )
        / len(alone),
        "batched_graphs_captured": chat.scheduler.decoder.captures,
    }


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
    parser.add_argument("--sections", default="env,matmul,bandwidth,attention,training,serving")
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
        "bandwidth": section_bandwidth,
        "attention": section_attention,
        "training": lambda: section_training(peaks),
        "serving": section_serving,
        "serving_qlora": lambda: section_serving("qlora"),
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
    failed = [key for key in results if key.endswith("_error")]
    failed += [f"training: {r['levers']}" for r in results.get("training", []) if "error" in r]
    if args.smoke and failed:  # the script itself must not rot: CI runs it at tiny sizes
        sys.exit(f"bench.gpu --smoke: failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
