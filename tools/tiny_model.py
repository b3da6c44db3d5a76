"""Small Llama-2-architecture models with random weights and the real Llama-2 tokenizer.

The base model of every test, of the CPU demo and of the benchmarks: built in about a second,
no download. `initializer_range=0.1` matters: with the default 0.02 a frozen random base is
too flat for LoRA to memorise anything in a few steps.
"""

import shutil
from pathlib import Path

TOKENIZER_FIXTURE = (
    Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "llama2-tokenizer"
)

# Every dimension is a multiple of 32, as Llama-2-7B's are: bitsandbytes' 4-bit CPU kernels
# (on CPUs with AVX512-BF16) assert it.
SIZES = {
    # about 20M parameters, most of them in the 32,000-token embedding and head
    "tiny": dict(
        hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8
    ),
    # a few million parameters: its adapters are small enough to pass as a data: URI in an
    # environment variable (at most 128 KiB on Linux)
    "micro": dict(
        hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4
    ),
    # about 100M parameters, for the CPU benchmarks
    "100m": dict(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12
    ),
}


def build_tiny_llama(
    out_dir: Path,
    size: str = "tiny",
    seed: int = 0,
    max_shard_size: str | None = None,
    **shape: int,
) -> Path:
    """Write a Hugging Face model folder (config, safetensors, tokenizer) and return it;
    with `max_shard_size`, the weights in several files and their index, as real bases."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        max_position_embeddings=4096,
        initializer_range=0.1,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **{**SIZES[size], **shape},
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    sharding = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **sharding)
    for item in TOKENIZER_FIXTURE.iterdir():
        shutil.copy(item, out_dir / item.name)
    return out_dir


def quantize_decoder_to_nf4(model, compute_dtype, device, share_shapes: bool = False) -> None:
    """A model built in memory (no checkpoint to load with a BitsAndBytesConfig): its decoder
    linears to bitsandbytes NF4 with double quantisation, as load_base_model loads them.
    `share_shapes`: linears of one shape share the first one's 4-bit weight (a measurement
    of memory, where the values do not matter: a CPU quantizes 7B-shaped layers slowly)."""
    import bitsandbytes as bnb
    import torch

    quantized_by_shape: dict = {}
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                quantized = bnb.nn.Linear4bit(
                    linear.in_features, linear.out_features, bias=False,
                    compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True,
                    device="meta",
                )  # fmt: skip
                shape = tuple(linear.weight.shape)
                if not share_shapes or shape not in quantized_by_shape:
                    quantized_by_shape[shape] = bnb.nn.Params4bit(
                        linear.weight.data,
                        requires_grad=False,
                        quant_type="nf4",
                        compress_statistics=True,
                    ).to(device)  # fmt: skip  (.to quantizes)
                quantized.weight = quantized_by_shape[shape]
                setattr(parent, name, quantized)
    model.is_loaded_in_4bit = True  # what peft's prepare_model_for_kbit_training looks for


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    args = parser.parse_args()
    print(build_tiny_llama(args.out_dir, args.size))
