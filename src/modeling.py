"""Loading the base model (full precision or 4-bit NF4) and wrapping it with LoRA."""

import contextlib
import importlib.util
import json
import math
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Regex, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import logging as hf_logging

from src import attention
from src.seeds import derive_seed

# All linear projections of a Llama decoder layer: attention and MLP.
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_parameters(model_config: dict, rank: int) -> int:
    """Parameters of a rank-`rank` adapter on LORA_TARGET_MODULES of a Llama decoder."""
    hidden, mlp = model_config["hidden_size"], model_config["intermediate_size"]
    heads = model_config["num_attention_heads"]
    kv_width = hidden * model_config.get("num_key_value_heads", heads) // heads
    # A LoRA pair on a linear of shape (in -> out) has rank x (in + out) parameters.
    attention = (hidden + hidden) * 2 + (hidden + kv_width) * 2  # q, o; k, v
    feed_forward = (hidden + mlp) * 3  # gate, up, down
    return rank * (attention + feed_forward) * model_config["num_hidden_layers"]


@dataclass(frozen=True)
class Placement:
    """Where and in which precision the model runs."""

    device: torch.device
    dtype: torch.dtype  # weights and compute dtype: bf16 on GPU, fp32 on CPU


def pick_placement() -> Placement:
    """bf16 on this process's GPU; fp32 on a CPU, but only where there is no NVIDIA GPU that
    torch cannot use (a 7B training would otherwise run on the CPU for days, silently)."""
    if torch.cuda.is_available():
        return Placement(torch.device("cuda", torch.cuda.current_device()), torch.bfloat16)
    driver = nvidia_driver_version()
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1")  # hidden on purpose
    if driver is not None and not hidden:
        cuda = torch.version.cuda or "none (a CPU-only build)"
        raise RuntimeError(
            f"this machine has an NVIDIA GPU (driver {driver}) that torch {torch.__version__} "
            f"cannot use (its CUDA: {cuda}): the driver is probably older than that CUDA "
            f"needs. Update the driver, or install a torch built for this driver's CUDA"
        )
    return Placement(torch.device("cpu"), torch.float32)


def nvidia_driver_version(proc_file: Path = Path("/proc/driver/nvidia/version")) -> str | None:
    """The NVIDIA kernel driver's version where one is loaded, else None."""
    try:
        text = proc_file.read_text()
    except OSError:
        return None
    found = re.search(r"Kernel Module(?: for [\w-]+)?\s+([\d.]+)", text)
    return found.group(1) if found else "unknown version"


def attention_implementation(placement: Placement) -> str:
    """FlashAttention-2's varlen kernels on a GPU where flash-attn is installed, else PyTorch's
    fused sdpa kernels run segment by segment (src/attention.py). Either way packed examples
    never attend to each other and no padding or mask is needed."""
    if placement.device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return attention.NAME


def read_model_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def context_window(model_dir: Path) -> int:
    return int(read_model_config(model_dir).get("max_position_embeddings", 4096))


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # "</s>" written in a user's text is text (src/prompt_format.encode_texts); the wrapper
    # copies this flag to the Rust tokenizer on every call, so it is set here, where it sticks.
    tokenizer.split_special_tokens = True
    split_words_for_speed(tokenizer)
    return tokenizer


def split_words_for_speed(tokenizer: PreTrainedTokenizerBase) -> None:
    """Let the Llama tokenizer work word by word; the token ids stay exactly the same.

    Llama-2's tokenizer.json has no pre-tokenizer, so BPE runs over each whole text as one
    word. No token of its vocabulary has "▁" (a space) after any other character, so no merge
    can cross the start of a "▁" run: cutting the text there changes nothing but the speed.
    The cut is only installed where that holds.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.pre_tokenizer is not None:
        return
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        return
    if any(re.search("[^▁]▁", token) for token in model["vocab"]):
        return
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("▁*[^▁]+|▁+"), behavior="isolated")


def load_base_model(
    model_dir: Path, quantize_4bit: bool, placement: Placement, attention: str | None = None
) -> PreTrainedModel:
    """The frozen base: in the placement's dtype, or in 4-bit NF4 with double quantisation.
    Attention: by default the packed rows' (training); serving passes transformers' sdpa."""
    quantization = None
    if quantize_4bit:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=placement.dtype,
        )
    hf_logging.disable_progress_bar()  # one bar per shard would flood the training logs
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=placement.dtype,
        quantization_config=quantization,
        device_map={"": placement.device},
        attn_implementation=attention or attention_implementation(placement),
    )
    model.config.use_cache = False  # training; packed rows are isolated only without the cache
    return model


def add_lora(
    model: PreTrainedModel,
    rank: int,
    alpha: int,
    dropout: float,
    quantized: bool,
    target_modules: list[str] | tuple[str, ...] = tuple(LORA_TARGET_MODULES),
    use_rslora: bool = False,
) -> PeftModel:
    """Trainable LoRA adapters on every linear projection of the decoder (or on
    `target_modules`, those of an adapter being continued); the base stays frozen."""
    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        use_rslora=use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    if quantized:
        # Unlike peft's prepare_model_for_kbit_training, the non-quantised parts (embeddings,
        # norms, head) stay in the placement's dtype: in bf16 an fp32 residual stream costs
        # 45% more activation memory and a third of the speed, for losses that agree within
        # 1% (tests/training/test_loop.py).
        keep_4bit_weights_trainable(model)
    with quiet_peft():
        peft_model = get_peft_model(model, lora)
    # Non-reentrant checkpointing, switched on per forward pass by the memory plan.
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()  # only reentrant checkpointing needs grads at the input
    set_activation_checkpointing(peft_model, False)
    return peft_model


def init_lora_weights(model: PeftModel, seed: int) -> None:
    """Draw a fresh adapter's weights as peft does (A: Kaiming-uniform, B: zeros), each A
    from its own generator seeded by the training's seed and the parameter's name: so the
    values do not depend on where or how the model was built (a meta-device model sharded
    over ranks draws the same ones as a whole model on one device)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                continue
            if ".lora_B." in name:
                parameter.zero_()
            elif ".lora_A." in name:
                generator = torch.Generator().manual_seed(derive_seed(seed, "lora init", name))
                values = torch.empty(parameter.shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)
                parameter.copy_(values)
            else:  # a meta-built model would train from whatever memory held
                raise ValueError(f"{name}: a trainable parameter that is not LoRA's A or B")


def keep_4bit_weights_trainable(model: PreTrainedModel) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, the first forward of a Linear4bit in eval mode without grad (a
    validation loss, a validation_prompt answer) repacks its weight for a kernel without
    autograd, for good: training afterwards would run through it, in bf16, with no gradient
    through the frozen base (the LoRA gradients change completely). bitsandbytes decides this
    per layer from a flag it sets at construction; a training model never takes that path.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft 0.21 reads an attribute that transformers 5 renamed: silence that one warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield


def set_activation_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Checkpoint every decoder layer in the next forward passes, or none: transformers reads
    each layer's flag at every call, so this can change from one pass to the next."""
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.gradient_checkpointing = on
