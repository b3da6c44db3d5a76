"""Weights that fail to load change nothing anyone else is served: checked whole before
anything touches the model, and undone if loading fails anyway. Non-finite weights are
refused by name."""

import json
import re

import peft.peft_model
import pytest
import torch

from src.errors import UserInputError
from src.prompt_format import encode_chat_prompt
from src.serving.chat import ChatModel
from tests.helpers import FACTS, plain_logits, served_logits, with_member, with_tensors

A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_KEY = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"


def _set(key: str, value: float):
    def change(tensors: dict) -> None:
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[3] = value

    return change


def _reshape(tensors: dict) -> None:
    rank, inputs = tensors[A_KEY].shape
    tensors[A_KEY] = torch.zeros(rank, inputs + 1)


BAD_TENSORS = {
    "wrong-shape": (_reshape, f"{A_KEY}: shape (16, 257), expected (16, 256)"),
    "nan": (_set(B_KEY, float("nan")), f"{B_KEY}: 1 of its 4096 values are NaN or infinite"),
    "inf": (_set(A_KEY, float("-inf")), f"{A_KEY}: 1 of its 4096 values are NaN or infinite"),
    "huge": (_set(A_KEY, 1e30), f"{A_KEY}: holds 1e+30, beyond 1e+04 in magnitude"),
    "integer": (
        lambda t: t.__setitem__(A_KEY, t[A_KEY].to(torch.int32)),
        f"{A_KEY}: dtype int32, not a floating-point one",
    ),
    "missing": (
        lambda t: t.pop(B_KEY),
        f"but 1 of their LoRA tensors are missing, such as {B_KEY}",
    ),
    "extra": (
        lambda t: t.__setitem__("base_model.model.lm_head.lora_A.weight", torch.zeros(16, 256)),
        "lm_head.lora_A.weight: adapts a layer the config's target_modules leave out",
    ),
}


def _config(**changes):
    """A change of adapter_config.json's fields."""

    def change(data: bytes) -> bytes:
        return json.dumps({**json.loads(data), **changes}).encode()

    return change


def logits(model: ChatModel, weights: str | None = None) -> torch.Tensor:
    """The first new token's logits for a fixed prompt, as the model serves them to a
    request with `weights` as its replicate_weights (None: the model's own)."""
    return served_logits(model, FACTS[0][0], weights)


def layer_types(model: ChatModel) -> list[str]:
    return [type(m).__name__ for m in model.model.modules()]


@pytest.fixture(scope="module")
def served(tiny_model_dir, facts_archive):
    """A server of the plain base, and one set up with weights (its own adapter)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BASE_MODEL", str(tiny_model_dir))
        yield {"plain base": ChatModel(None), "with weights": ChatModel(str(facts_archive))}


@pytest.mark.parametrize("setup", ["plain base", "with weights"])
@pytest.mark.parametrize("bad", BAD_TENSORS)
def test_a_refused_adapter_leaves_every_logit_as_it_was(
    served, facts_archive, tmp_path, setup, bad
):
    model = served[setup]
    before, types = logits(model), layer_types(model)
    unpacked = sorted(model.store.root.iterdir())
    change, message = BAD_TENSORS[bad]
    archive = with_tensors(facts_archive, tmp_path / f"{bad}.tar", change)
    with pytest.raises(UserInputError) as error:
        logits(model, str(archive))
    assert message in str(error.value)
    assert f"weights {archive}" in str(error.value)  # names the weights it refused
    assert logits(model).equal(before) and layer_types(model) == types
    assert sorted(model.store.root.iterdir()) == unpacked  # nothing of it kept on disk


@pytest.mark.parametrize("setup", ["plain base", "with weights"])
def test_a_load_that_fails_half_way_is_undone(
    served, facts_archive, other_facts_archive, tmp_path, monkeypatch, setup
):
    """Should peft fail after it injected the layers and copied the tensors (as torch's
    load_state_dict does before it reports a mismatch), the injection is taken out again."""
    model = served[setup]
    before, types = logits(model), layer_types(model)
    loaded = dict(model.loaded)
    real_load = peft.peft_model.set_peft_model_state_dict

    def load_then_fail(*args, **kwargs):
        real_load(*args, **kwargs)
        raise RuntimeError("size mismatch for one tensor (injected by the test)")

    monkeypatch.setattr(peft.peft_model, "set_peft_model_state_dict", load_then_fail)
    with pytest.raises(UserInputError, match="not a valid adapter for this base model"):
        logits(model, str(other_facts_archive))
    monkeypatch.undo()
    assert logits(model).equal(before) and layer_types(model) == types
    assert dict(model.loaded) == loaded
    expected = logits(ChatModel(str(other_facts_archive)))
    assert logits(model, str(other_facts_archive)).equal(expected)  # and it loads later
    assert logits(model).equal(before)


def test_setup_weights_with_a_nan_fail_setup_naming_the_tensor(
    base_model_env, facts_archive, tmp_path
):
    archive = with_tensors(facts_archive, tmp_path / "nan.tar", _set(B_KEY, float("nan")))
    with pytest.raises(UserInputError, match=f"{B_KEY}: 1 of its 4096 values are NaN"):
        ChatModel(str(archive))


@pytest.mark.parametrize(
    ("member", "change", "message"),
    [
        (
            "adapter_model.safetensors",
            lambda data: data[:-100],
            "adapter_model.safetensors is not a readable safetensors file",
        ),
        ("adapter_config.json", lambda d: d.replace(b'"r": 16', b'"r": 0'), "r must be a positive"),
        (
            "adapter_config.json",
            lambda d: d.replace(b'"r": 16', b'"r": "eight"'),
            "r must be a positive whole number, got 'eight'",
        ),
        (
            "adapter_config.json",
            lambda d: (
                d.replace(b'"q_proj"', b'"attention"')
                .replace(b'"k_proj"', b'"x"')
                .replace(b'"v_proj"', b'"y"')
                .replace(b'"o_proj"', b'"z"')
                .replace(b'"gate_proj"', b'"a"')
                .replace(b'"up_proj"', b'"b"')
                .replace(b'"down_proj"', b'"c"')
            ),
            "name no linear layer of this base (its layers end in down_proj, gate_proj,",
        ),
        (
            "adapter_config.json",
            _config(init_lora_weights="olora"),
            "init_lora_weights 'olora' rewr",
        ),
        ("adapter_config.json", _config(init_lora_weights="pissa"), "base model's weights when"),
        ("adapter_config.json", _config(loftq_config={"loftq_bits": 4}), "loftq_config rewrites"),
        (
            "adapter_config.json",
            _config(r="x" * 10**6),
            "got '" + "x" * 36 + "...\n",
        ),
        ("training_metadata.json", lambda d: b"[" + d + b"]", "is a JSON list, not an object"),
        ("training_metadata.json", lambda d: d[:10], "training_metadata.json is not valid JSON"),
    ],
)
def test_broken_archives_are_refused_by_what_is_wrong(
    served, facts_archive, tmp_path, member, change, message
):
    model = served["plain base"]
    before = logits(model)
    archive = with_member(facts_archive, tmp_path / "broken.tar", member, change)
    with pytest.raises(UserInputError) as error:
        logits(model, str(archive))
    assert message in str(error.value) + "\n"
    assert len(str(error.value)) < 1000  # nothing of the file quoted at length
    assert logits(model).equal(before)


def test_special_files_are_never_read_as_weights(served, tmp_path):
    """A local replicate_weights is read from the server's own disk: regular files only."""
    import os

    model = served["plain base"]
    fifo = tmp_path / "weights.tar"
    os.mkfifo(fifo)  # opening it would block the server for good
    for path, message in (
        ("/proc/self/environ", "is a system file under /proc"),
        ("/dev/zero", "is a system file under /dev"),
        (str(fifo), "is not a regular file (a device, FIFO or socket)"),
    ):
        with pytest.raises(
            UserInputError, match=re.escape(f"replicate_weights ({path}) {message}")
        ):
            logits(model, path)


@pytest.mark.parametrize(
    "changes",
    [
        {"layers_to_transform": [0], "layers_pattern": "layers"},
        {"exclude_modules": ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"]},
    ],
)
def test_adapters_of_part_of_the_layers_are_served_as_peft_loads_them(
    served, facts_archive, tiny_model_dir, tmp_path, changes
):
    """peft's own targeting rule decides which layers must have tensors: an adapter of
    layer 0 only, or one with modules excluded, loads and computes what peft computes."""
    from peft import PeftModel

    from src.artifact import read_archive
    from src.modeling import Placement, load_base_model

    def only_the_targeted(tensors: dict) -> None:
        for key in list(tensors):
            dropped = "layers.0." not in key
            if "exclude_modules" in changes:
                dropped = any(f"{m}.lora_" in key for m in changes["exclude_modules"])
            if dropped:
                del tensors[key]

    partial = with_tensors(facts_archive, tmp_path / "tensors.tar", only_the_targeted)
    partial = with_member(
        partial, tmp_path / "partial.tar", "adapter_config.json", _config(**changes)
    )
    model = served["plain base"]
    before = logits(model)
    adapter_logits = logits(model, str(partial))
    base = load_base_model(
        tiny_model_dir, False, Placement(torch.device("cpu"), torch.float32), attention="sdpa"
    )
    folder = read_archive(partial, tmp_path / "unpacked").folder
    reference = PeftModel.from_pretrained(base, folder).eval()
    ids = encode_chat_prompt(model.tokenizer, FACTS[0][0])
    expected = plain_logits(reference, ids)
    torch.testing.assert_close(adapter_logits, expected, rtol=0, atol=1e-5)
    assert not adapter_logits.equal(before)
    assert logits(model).equal(before)
