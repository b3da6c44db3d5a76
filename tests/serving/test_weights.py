"""Weights from real Replicate trainings, and hostile archives, tar and zip alike.

Replicate's trainer for this model (replicate/cog-llama-template, peft 0.4) returned a zip of
`adapter_config.json` and a pickled `adapter_model.bin`, LoRA on q_proj and v_proj only, with
no training metadata.
"""

import io
import json
import os
import pickle
import re
import zipfile

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import src.artifact
from src.adapters import WeightsStore
from src.errors import UserInputError
from src.modeling import Placement, load_base_model
from src.prompt_format import encode_chat_prompt
from src.serving.chat import ChatModel
from tests.helpers import FACTS, plain_logits, serve_directory, served_logits
from tools.tiny_model import build_tiny_llama

CPU_FP32 = Placement(torch.device("cpu"), torch.float32)
# adapter_config.json as peft 0.4 wrote it: keys that peft 0.21 no longer has
PEFT_0_4_CONFIG = {
    "base_model_name_or_path": "/src/llama_weights/llama-2-7b-chat", "bias": "none",
    "enable_lora": None, "fan_in_fan_out": False, "inference_mode": True, "lora_alpha": 16,
    "lora_dropout": 0.05, "merge_weights": False, "modules_to_save": None, "peft_type": "LORA",
    "r": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM",
}  # fmt: skip


def replicate_adapter(model_dir, folder):
    """An adapter as Replicate's trainer saved it: q_proj and v_proj, pickled, peft 0.4 config."""
    base = load_base_model(model_dir, False, CPU_FP32, attention="sdpa")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base, lora)
    torch.manual_seed(3)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    model.save_pretrained(folder, safe_serialization=False)
    (folder / "adapter_config.json").write_text(json.dumps(PEFT_0_4_CONFIG))
    assert (folder / "adapter_model.bin").is_file()
    return folder


def zip_of(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zipped:
        for name, data in members.items():
            zipped.writestr(name, data)
    return path


@pytest.fixture(scope="module")
def replicate_zip(tiny_model_dir, tmp_path_factory):
    folder = replicate_adapter(tiny_model_dir, tmp_path_factory.mktemp("replicate"))
    members = {name: (folder / name).read_bytes() for name in src.artifact.ARCHIVE_MEMBERS
               if (folder / name).is_file()}  # fmt: skip
    members |= {"README.md": b"trained on Replicate", "logs/train.log": b"step 1"}
    return zip_of(folder.parent / "training_output.zip", members), folder


def first_logits(model, tokenizer) -> torch.Tensor:
    """A reference model's first logits for the prompt the served ones answer."""
    return plain_logits(model, encode_chat_prompt(tokenizer, FACTS[0][0]))


def test_a_replicate_training_serves_as_it_trained(
    base_model_env, replicate_zip, tokenizer, capsys
):
    archive, folder = replicate_zip
    served = ChatModel(str(archive))
    logs = capsys.readouterr().out
    assert "no training_metadata.json" in logs and "its training facts are unknown" in logs
    assert "not read from the archive: README.md, logs/train.log" in logs
    base = load_base_model(base_model_env, False, CPU_FP32, attention="sdpa")
    trained = PeftModel.from_pretrained(base, folder).eval()  # peft reading its own .bin
    torch.testing.assert_close(served_logits(served, FACTS[0][0]), first_logits(trained, tokenizer))
    unpacked = served.store.unpack(str(archive)).folder
    assert sorted(p.name for p in unpacked.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]  # converted; the pickle is gone


def test_a_replicate_training_as_replicate_weights(
    base_model_env, replicate_zip, facts_archive, tokenizer
):
    archive, _ = replicate_zip
    model = ChatModel(str(facts_archive))
    trained = served_logits(ChatModel(str(archive)), FACTS[0][0])
    with serve_directory(archive.parent) as (url, _):
        from_url = served_logits(model, FACTS[0][0], f"{url}/{archive.name}")
    torch.testing.assert_close(from_url, trained)


def test_an_adapter_for_another_shape_is_refused_before_it_loads(base_model_env, tmp_path, capsys):
    other = build_tiny_llama(tmp_path / "wide", size="micro")  # hidden 64, not 256
    folder = replicate_adapter(other, tmp_path / "adapter")
    archive = zip_of(tmp_path / "w.zip", {
        "adapter_config.json": (folder / "adapter_config.json").read_bytes(),
        "adapter_model.bin": (folder / "adapter_model.bin").read_bytes(),
    })  # fmt: skip
    with pytest.raises(UserInputError) as error:
        ChatModel(str(archive))
    message = str(error.value)
    assert "do not fit this server's base model" in message
    assert "q_proj.lora_A.weight: shape (8, 64), expected (8, 256) (r, the layer's" in message


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/replicate-weights-exploit",))


def deflate_bomb() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("adapter_model.safetensors", b"\0" * (4 << 20))
    return buffer.getvalue()


def symlink_zip(path):
    info = zipfile.ZipInfo("adapter_model.safetensors")
    info.external_attr = 0o120777 << 16  # a symbolic link
    with zipfile.ZipFile(path, "w") as zipped:
        zipped.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda p: zip_of(p, {"../../escaped.txt": b"x"}), "unsafe path"),
        (lambda p: zip_of(p, {"/tmp/escaped-abs.txt": b"x"}), "unsafe path"),
        (lambda p: zip_of(p, {"C:/escaped.txt": b"x"}), "unsafe path"),
        (symlink_zip, "only files and folders are allowed"),
        (lambda p: p.write_bytes(deflate_bomb()) and p, "exceeds the limit"),
        (
            lambda p: zip_of(
                p, {"adapter_config.json": b"{}", "adapter_model.bin": pickle.dumps(Exploit())}
            ),
            "adapter_model.bin is not a plain dictionary of tensors",
        ),
        (lambda p: p.write_bytes(b"PK\x03\x04 not really a zip") and p, "not a readable"),
    ],
)
def test_hostile_zips_are_refused_like_hostile_tars(tmp_path, monkeypatch, build, message):
    monkeypatch.setattr(src.artifact, "MAX_ARCHIVE_BYTES", 1 << 20)
    marker = "/tmp/replicate-weights-exploit"
    if os.path.exists(marker):
        os.remove(marker)
    archive = build(tmp_path / "evil.zip")
    store = WeightsStore(tmp_path / "a" / "b" / "weights")
    with pytest.raises(UserInputError, match=message):
        store.unpack(str(archive))
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "evil.zip"]
    assert all(store.root in p.parents for p in written), written
    assert not any("escaped" in p.name for p in written)
    assert not os.path.exists(marker)  # no code from a pickle ever ran
    assert sum(p.stat().st_size for p in written) <= 1 << 20  # never more than the cap


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"target_modules": ["v_proj"]}, "adapts a layer the config's target_modules leave out"),
        ({"r": 16}, "shape (8, 256), expected (16, 256)"),
        ({"peft_type": "PREFIX_TUNING"}, "only LoRA is served"),
    ],
)
def test_a_foreign_config_must_describe_its_tensors(
    base_model_env, replicate_zip, tmp_path, change, message
):
    _, folder = replicate_zip
    config = {**PEFT_0_4_CONFIG, **change}
    archive = zip_of(tmp_path / "w.zip", {
        "adapter_config.json": json.dumps(config).encode(),
        "adapter_model.bin": (folder / "adapter_model.bin").read_bytes(),
    })  # fmt: skip
    with pytest.raises(UserInputError, match=re.escape(message)):
        ChatModel(str(archive))


def test_a_tar_with_dotted_names_extra_members_and_a_zip_inside(
    base_model_env, replicate_zip, tmp_path, capsys
):
    """`tar -C dir -cf w.tar .` writes ./names; a zip member does not make it a zip."""
    import tarfile

    archive, folder = replicate_zip
    with tarfile.open(tmp_path / "w.tar", "w") as tar:
        for name in ("adapter_config.json", "adapter_model.bin"):
            tar.add(folder / name, arcname=f"./{name}")
        tar.add(archive, arcname="./old/training_output.zip")
    adapter = WeightsStore(tmp_path / "store").unpack(str(tmp_path / "w.tar"))
    assert sorted(p.name for p in adapter.folder.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"
    ]  # fmt: skip
    assert "not read from the archive: ./old/training_output.zip" in capsys.readouterr().out


def test_nothing_half_unpacked_stays_behind(tmp_path):
    good = zip_of(tmp_path / "good.zip", {"adapter_config.json": b"{}" * 100})
    data = bytearray(good.read_bytes())
    data[40:44] = b"XXXX"  # inside the compressed member: its CRC no longer matches
    (tmp_path / "bad.zip").write_bytes(bytes(data))
    store = WeightsStore(tmp_path / "store")
    with pytest.raises(UserInputError):
        store.unpack(str(tmp_path / "bad.zip"))
    assert not [p for p in store.root.rglob("*") if p.is_file()]
