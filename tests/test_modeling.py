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
