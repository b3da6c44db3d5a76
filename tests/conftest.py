"""Shared fixtures: one tiny Llama-2 model with the real tokenizer, built once per test session."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in a test may reach the internet
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path

import pytest

from tests.helpers import FACTS, write_jsonl
from tools.tiny_model import TOKENIZER_FIXTURE, build_tiny_llama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_FIXTURE)


@pytest.fixture
def base_model_env(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BASE_MODEL", str(tiny_model_dir))
    return tiny_model_dir


@pytest.fixture(scope="session")
def facts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Made-up facts, each repeated, so that a few epochs memorise them."""
    rows = [{"prompt": p, "completion": c} for p, c in FACTS] * 4
    return write_jsonl(tmp_path_factory.mktemp("data") / "facts.jsonl", rows)
