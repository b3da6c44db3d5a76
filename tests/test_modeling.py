"""The word-by-word speed-up of the Llama tokenizer changes no token id."""

import json
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from src.modeling import load_tokenizer
from src.prompt_format import encode_texts
from tools.tiny_model import TOKENIZER_FIXTURE

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def fast_and_plain():
    return load_tokenizer(TOKENIZER_FIXTURE), AutoTokenizer.from_pretrained(TOKENIZER_FIXTURE)


def odd_texts(count: int) -> list[str]:
    rng = random.Random(0)
    pieces = [
        "llama",
        " ",
        "  ",
        "   ",
        "\n",
        "\t",
        "▁",
        "Ꙋ",
        "🦙",
        "镇",
        "é",
        ".",
        ",",
        "ab",
        "grabbed",
        "1852",
        "[INST]",
        "<<SYS>>",
        "Quillton",
        " \n ",
        "x" * 40,
    ]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(count)]


def test_the_split_is_installed(fast_and_plain):
    fast, plain = fast_and_plain
    assert fast.backend_tokenizer.pre_tokenizer is not None
    assert plain.backend_tokenizer.pre_tokenizer is None


def test_reference_vectors_and_odd_texts_tokenize_identically(fast_and_plain):
    fast, plain = fast_and_plain
    texts = odd_texts(3000)
    for name in ("llama2_tokenizer_vectors.json", "llama2_llamacpp_vectors.json"):
        texts += [case["text"] for case in json.loads((FIXTURES / name).read_text())["cases"]]
    expected = plain(texts, add_special_tokens=False)["input_ids"]
    assert encode_texts(fast, texts) == expected
    assert fast(texts, add_special_tokens=False)["input_ids"] == expected


def test_the_nvidia_driver_version_is_read_from_the_kernel(tmp_path):
    from src.modeling import nvidia_driver_version

    proprietary = tmp_path / "a"
    proprietary.write_text(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  470.82.01  Wed Oct 27 2021\n"
    )
    open_module = tmp_path / "b"
    open_module.write_text(
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build\n"
    )
    assert nvidia_driver_version(proprietary) == "470.82.01"
    assert nvidia_driver_version(open_module) == "580.159.04"
    assert nvidia_driver_version(tmp_path / "none") is None


def test_a_gpu_that_torch_cannot_use_stops_the_run(monkeypatch):
    import torch

    import src.modeling

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(src.modeling, "nvidia_driver_version", lambda: "470.82.01")
    with pytest.raises(RuntimeError) as error:
        src.modeling.pick_placement()
    message = str(error.value)
    assert "NVIDIA GPU (driver 470.82.01)" in message and torch.__version__ in message
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hidden on purpose: the CPU it is
    assert src.modeling.pick_placement().device.type == "cpu"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(src.modeling, "nvidia_driver_version", lambda: None)
    assert src.modeling.pick_placement().device.type == "cpu"
