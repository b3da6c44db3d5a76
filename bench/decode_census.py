"""Operation census of one batched decode step (src/serving/batch_step.decode_step), counted
without a GPU.

    python -m bench.decode_census                 # Llama-2-7B's shapes, one row, an adapter
    python -m bench.decode_census --size tiny     # the tests' tiny model
    python -m bench.decode_census --compiled      # and the compiled step's kernels

Eager: the model is built on the meta device in bf16 with a rank-8 LoRA adapter on the seven
projections (no memory, no arithmetic), the adapter put into a slot of the step's stack, and
one step of one row (its sampling included, as a captured step runs it: the batched sort)
runs under bench/census.py's dispatch mode, which counts every ATen operation that launches
a kernel (views do not). One decoder layer is the difference between a two-layer and a
one-layer model; the rest is the embedding, the head and the sampling.

Compiled (`--compiled`): tiny models of one and two layers with real weights on the CPU
(the tiny model's shapes: kernels do not depend on them), the step compiled by
torch.compile as PREDICT_COMPILE compiles it on a GPU, and the kernels its generated code
launches counted (a fused kernel is one; matmuls and other library calls one each). Inductor
fuses alike on a CPU and a GPU, though not identically: a guide, not the GPU's exact count.
"""

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path

import torch

from bench.census import SIZES, Census, Counting

PROMPT_TOKENS = 200
ATTENDED = 256


def one_row(model, prompt_ids: list[int], attended: int = ATTENDED):
    """(stack, pool, rows) of one row decoding after `prompt_ids` with the model's adapter
    ("default") in a slot, predict.py's default sampling: what decode_step takes."""
    from src.serving.adapter_stack import AdapterStack, largest_rank
    from src.serving.batch_step import DecodeRows, KVPool
    from src.serving.sampling import SamplingSettings

    config = model.config
    embedding = model.get_input_embeddings().weight
    stack = AdapterStack.build(model, 4, largest_rank(model))
    slot = stack.assign(next(iter(model.peft_config)), set())
    pool = KVPool.empty(config, 1, attended, embedding.dtype, embedding.device)
    rows = DecodeRows.empty(1, config.vocab_size, embedding.device)
    rows.sampling.set_row(0, SamplingSettings(max_new_tokens=64), 1, prompt_ids)
    rows.start(0, prompt_ids[-1], len(prompt_ids), slot)
    return stack, pool, rows


def meta_model(size: str, layers: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from src.modeling import LORA_TARGET_MODULES

    config = LlamaConfig(**SIZES[size], num_hidden_layers=layers, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGET_MODULES)
    return get_peft_model(model, lora).eval()


def count_step(size: str, layers: int) -> Census:
    from src.serving.batch_step import decode_step

    model = meta_model(size, layers)
    stack, pool, rows = one_row(model, list(range(3, 3 + PROMPT_TOKENS)))
    census = Census()
    with torch.inference_mode(), Counting(census):
        decode_step(model, stack, pool, rows.first(1), ATTENDED, 2, shortcuts=False)
    return census


def eager(size: str) -> dict:
    one, two = count_step(size, 1), count_step(size, 2)
    layer, rest = two.minus(one), one.minus(two.minus(one))
    layers = 32 if size == "7b" else 4
    return {
        "decoder_layer": dict(layer.operations.most_common()),
        "decoder_layer_kernels": layer.kernels,
        "rest": dict(rest.operations.most_common()),
        "rest_kernels": rest.kernels,
        "step_kernels": rest.kernels + layers * layer.kernels,
        "layers": layers,
    }


def compiled_kernels(layers: int, folder: Path) -> dict:
    """Kernels launched by the compiled step of a tiny model of `layers` layers (real
    weights, a random adapter, the CPU), by kind."""
    from peft import LoraConfig, get_peft_model
    from torch._inductor.utils import run_and_get_code

    from src.modeling import LORA_TARGET_MODULES, Placement, load_base_model
    from src.serving.batch_step import decode_step
    from tools.tiny_model import build_tiny_llama

    model_dir = build_tiny_llama(folder / f"layers-{layers}", num_hidden_layers=layers)
    placement = Placement(torch.device("cpu"), torch.float32)
    model = load_base_model(model_dir, False, placement, attention="sdpa")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGET_MODULES,
                      init_lora_weights=False)  # fmt: skip  # random B: an adapter that acts
    model = get_peft_model(model, lora).eval()
    stack, pool, rows = one_row(model, list(range(3, 3 + PROMPT_TOKENS)))
    torch._dynamo.reset()
    step = torch.compile(decode_step, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        _, sources = run_and_get_code(step, model, stack, pool, rows.first(1), ATTENDED, 2, False)
    return _kernel_calls("\n".join(sources))


def compiled() -> dict:
    """The compiled step's kernels per layer and in the rest, and a 32-layer step's."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        one, two = (compiled_kernels(n, Path(folder)) for n in (1, 2))
    layer = {kind: two[kind] - one[kind] for kind in one}
    rest = {kind: one[kind] - layer[kind] for kind in one}
    return {
        "decoder_layer": layer,
        "decoder_layer_kernels": sum(layer.values()),
        "rest": rest,
        "rest_kernels": sum(rest.values()),
        "step_kernels_32_layers": sum(rest.values()) + 32 * sum(layer.values()),
    }


def _kernel_calls(source: str) -> dict:
    """Kernel launches in inductor's generated `call`: its fused kernels, library calls."""
    body = source[source.index("def call(") :]
    return {
        "fused": len(re.findall(r"^\s+cpp_fused_\w+\(", body, re.M))
        + len(re.findall(r"^\s+triton_\w+\.run\(", body, re.M)),
        "library": len(re.findall(r"extern_kernels\.\w+\(|torch\.ops\.\w+\.\w+", body)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="7b")
    parser.add_argument(
        "--compiled", action="store_true", help="also count the compiled step's kernels (CPU)"
    )
    args = parser.parse_args()
    with contextlib.redirect_stdout(sys.stderr):
        result = {"eager": eager(args.size)}
        if args.compiled:
            result["compiled"] = compiled()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
