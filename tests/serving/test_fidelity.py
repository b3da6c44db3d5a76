"""The served model computes what was trained, in the precision it serves in.

The reference is the trained model: the same base weights with the adapter applied unmerged
in fp32. The bound is how far that trained model itself moves between bf16 and fp32 on the
same prompts: serving in bf16 may not lose more than bf16 arithmetic already loses. The
logits compared are those the predictor samples the next token from (its decoder's prefill).
"""

import pytest
import torch
from peft import PeftModel

from src.adapters import WeightsStore
from src.modeling import Placement, keep_4bit_weights_trainable, load_base_model
from src.prompt_format import encode_chat_prompt
from src.serving.chat import ChatModel, adapter_name, load_inference_base
from src.serving.decoding import EagerDecoder, GraphedDecoder
from tests.helpers import FACTS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROMPTS = [prompt for prompt, _ in FACTS] + ["Tell me about llamas.", "What is 2 + 2?"]


def next_token_logits(model, tokenizer, decoder=None) -> torch.Tensor:
    """(prompts, V) fp32 logits of each prompt's next token, through a decoder's prefill:
    the served model's own decoder, or for a reference model the plain dynamic cache."""
    decoder = decoder or EagerDecoder(model)
    with torch.no_grad():
        rows = [decoder.prefill(encode_chat_prompt(tokenizer, p), 1) for p in PROMPTS]
    return torch.cat(rows).float()


def served_logits(chat: ChatModel, tokenizer) -> torch.Tensor:
    """What the predictor samples the first token from: its decoder (graphs on a GPU)."""
    chat.use_weights(None)  # the setup weights
    return next_token_logits(chat.model, tokenizer, chat.decoder)


def trained_model(model_dir, adapter_folder, dtype: torch.dtype, quantized: bool = False):
    """The model as it trained: the base (4-bit for QLoRA) and the adapter, unmerged."""
    base = load_base_model(model_dir, quantized, Placement(DEVICE, dtype), attention="sdpa")
    if quantized:
        keep_4bit_weights_trainable(base)  # computes as in training
    return PeftModel.from_pretrained(base, adapter_folder).eval()


def served(monkeypatch, archive: str, dtype: str) -> ChatModel:
    monkeypatch.setenv("PREDICT_DTYPE", dtype)
    return ChatModel(archive)


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_served_logits_are_within_what_bf16_itself_costs(
    base_model_env, facts_archive, qlora_archive, tokenizer, monkeypatch, quantized
):
    archive = str(qlora_archive if quantized else facts_archive)
    bf16 = served(monkeypatch, archive, "bfloat16")
    adapter = bf16.store.unpack(archive).folder
    reference = next_token_logits(
        trained_model(base_model_env, adapter, torch.float32, quantized), tokenizer
    )
    in_bf16 = next_token_logits(
        trained_model(base_model_env, adapter, torch.bfloat16, quantized), tokenizer
    )
    # On the tiny model (CPU), the trained model in bf16 is 0.31 (LoRA) and 1.70 (QLoRA) away
    # from itself in fp32 at most; on Llama-2-7B (H200) 0.34 (docs/benchmarks.md).
    bound = (in_bf16 - reference).abs().max()
    assert bound > 0  # bf16 really is coarser
    served_bf16 = served_logits(bf16, tokenizer)
    assert (served_bf16 - reference).abs().max() <= bound
    # Not by chance: the served model runs the trained model's modules and kernels in eval
    # (QLoRA's 4-bit ones included), so its logits are the trained model's in bf16, exactly.
    assert torch.equal(served_bf16, in_bf16)
    served_fp32 = served_logits(served(monkeypatch, archive, "float32"), tokenizer)
    assert (served_fp32 - reference).abs().max() <= 1e-4 * reference.abs().max()
    assert bf16.from_qlora == quantized


def test_a_hundred_swaps_leave_the_base_bit_identical(
    base_model_env, facts_archive, other_facts_archive, tokenizer, monkeypatch
):
    """Nothing is merged into the base, on activation or on a swap: it stays as loaded."""
    model = served(monkeypatch, str(facts_archive), "bfloat16")
    loaded = load_inference_base(base_model_env, False, model.placement).state_dict()
    first = next_token_logits(model.model, tokenizer)
    for swap in range(100):
        model.use_weights(str(other_facts_archive if swap % 2 == 0 else facts_archive))
    first_adapter = adapter_name(WeightsStore.identity(str(facts_archive)))
    assert model.active == first_adapter  # back on the first adapter
    now = {
        name.replace(".base_layer", ""): tensor
        for name, tensor in model.model.get_base_model().state_dict().items()
        if "lora_" not in name
    }
    assert now.keys() == loaded.keys()
    assert all(torch.equal(now[name], tensor) for name, tensor in loaded.items())
    assert torch.equal(next_token_logits(model.model, tokenizer), first)


def test_predict_dtype_must_be_known(base_model_env, facts_archive, monkeypatch):
    from src.errors import UserInputError

    monkeypatch.setenv("PREDICT_DTYPE", "float8")
    with pytest.raises(UserInputError, match="PREDICT_DTYPE must be one of bfloat16, float32"):
        ChatModel(str(facts_archive))


# ---------------------------------------------------------------- the decoders


def greedy(decoder, prompt_ids: list[int], tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    ids, logits = [], [decoder.prefill(prompt_ids, tokens)]
    with torch.no_grad():
        for _ in range(tokens):
            token = logits[-1].argmax(-1, keepdim=True)  # (1, 1)
            ids.append(int(token))
            logits.append(decoder.step(token))
    return ids, logits


@pytest.mark.parametrize("prompt_tokens", [12, 300])  # buckets of 256 and 512
def test_static_caches_decode_as_the_dynamic_cache(chat_models, prompt_tokens):
    model, tokenizer = chat_models["float32"]
    prompt = encode_chat_prompt(tokenizer, "llama " * prompt_tokens)[:prompt_tokens]
    expected_ids, expected_logits = greedy(EagerDecoder(model.model), prompt, 20)
    static = GraphedDecoder(model.model, model.context_window, graphs=False)
    for _ in range(2):  # the second request reuses (and resets) the cache
        ids, logits = greedy(static, prompt, 20)
        assert ids == expected_ids
        for ours, theirs in zip(logits, expected_logits, strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_cuda_graphs_replay_the_eager_steps(chat_models):
    model, tokenizer = chat_models["bfloat16"]
    prompt = encode_chat_prompt(tokenizer, PROMPTS[0])
    eager = GraphedDecoder(model.model, model.context_window, graphs=False)
    expected_ids, expected_logits = greedy(eager, prompt, 30)
    graphed = GraphedDecoder(model.model, model.context_window)
    for _ in range(2):  # captured once, replayed on the second request
        ids, logits = greedy(graphed, prompt, 30)
        assert ids == expected_ids
        for ours, theirs in zip(logits, expected_logits, strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-2, rtol=1e-2)
    assert len(graphed.graphs) == 1


@pytest.fixture(scope="module")
def chat_models(tiny_model_dir, facts_archive, tokenizer):
    models = {}
    for dtype in ("float32", "bfloat16"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("BASE_MODEL", str(tiny_model_dir))
            patch.setenv("PREDICT_DTYPE", dtype)
            models[dtype] = ChatModel(str(facts_archive)), tokenizer
    return models


def test_a_graph_that_cannot_be_captured_falls_back_to_eager_steps(chat_models, monkeypatch):
    """Some stack may hold a kernel that CUDA graphs cannot capture: serving goes on."""
    model, tokenizer = chat_models["float32"]

    def refuse(self, cache):
        raise RuntimeError("operation not permitted when stream is capturing\ndetails")

    monkeypatch.setattr(GraphedDecoder, "_capture", refuse)
    prompt = encode_chat_prompt(tokenizer, PROMPTS[1])
    expected_ids, _ = greedy(EagerDecoder(model.model), prompt, 12)
    decoder = GraphedDecoder(model.model, model.context_window, graphs=True)
    assert greedy(decoder, prompt, 12)[0] == expected_ids
    assert not decoder.use_graphs


def test_the_static_decoder_prefills_exactly_as_the_model_runs_plainly(chat_models):
    """The GPU decoder's first logits (prefill) are the plain model's, bit for bit."""
    for dtype in ("float32", "bfloat16"):
        model, tokenizer = chat_models[dtype]
        static = GraphedDecoder(model.model, model.context_window, graphs=False)
        assert torch.equal(
            next_token_logits(model.model, tokenizer, static),
            next_token_logits(model.model, tokenizer),
        )


def test_the_cache_holds_the_prompt_and_every_new_token(chat_models):
    """A 250-token prompt with 20 new tokens needs the 512-slot cache, not the 256 one."""
    model, tokenizer = chat_models["float32"]
    prompt = encode_chat_prompt(tokenizer, "llama " * 250)[:250]
    decoder = GraphedDecoder(model.model, model.context_window, graphs=False)
    ids, _ = greedy(decoder, prompt, 20)
    assert decoder.bucket == 512
    assert ids == greedy(EagerDecoder(model.model), prompt, 20)[0]
