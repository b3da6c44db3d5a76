"""Shared fixtures: one tiny Llama-2 model with the real tokenizer, built once per test session."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in a test may reach the internet
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import base64
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    ARCHIVE_COPIES,
    FACTS,
    FAST_LEARNING,
    OTHER_FACTS,
    call_train,
    serve_directory,
    webhook_receiver,
    write_jsonl,
)
from tools.cog_server import CogServer, cog_server
from tools.tiny_model import TOKENIZER_FIXTURE, build_tiny_llama

PROJECT_DIR = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def archive_copies(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Where call_train keeps the archives it takes, as Cog takes them."""
    ARCHIVE_COPIES.append(tmp_path_factory.mktemp("archives"))


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


@pytest.fixture(scope="module")
def base_model_env_module(tiny_model_dir: Path) -> Iterator[Path]:
    """BASE_MODEL for a module's shared chat models."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BASE_MODEL", str(tiny_model_dir))
        yield tiny_model_dir


@pytest.fixture(scope="session")
def facts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Made-up facts, each repeated, so that a few epochs memorise them."""
    rows = [{"prompt": p, "completion": c} for p, c in FACTS] * 4
    return write_jsonl(tmp_path_factory.mktemp("data") / "facts.jsonl", rows)


def _train(tiny_model_dir: Path, data: Path, **overrides) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BASE_MODEL", str(tiny_model_dir))
        return call_train(train_data=str(data), **{**FAST_LEARNING, **overrides})


@pytest.fixture(scope="session")
def facts_archive(tiny_model_dir: Path, facts_file: Path) -> Path:
    """Weights of a LoRA training that memorised FACTS."""
    return _train(tiny_model_dir, facts_file)


@pytest.fixture(scope="session")
def other_facts_archive(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Weights of a second LoRA training, on OTHER_FACTS (same prompts, other answers)."""
    rows = [{"prompt": p, "completion": c} for p, c in OTHER_FACTS] * 4
    data = write_jsonl(tmp_path_factory.mktemp("other") / "other.jsonl", rows)
    return _train(tiny_model_dir, data)


@pytest.fixture(scope="session")
def qlora_archive(tiny_model_dir: Path, facts_file: Path) -> Path:
    return _train(tiny_model_dir, facts_file, peft_method="qlora", num_train_epochs=2)


@pytest.fixture
def webhook():
    """A webhook URL on 127.0.0.1 and the list of JSON bodies posted to it."""
    with webhook_receiver() as (url, received):
        yield url, received


# Cog's real train server, shared by the HTTP tests of training and of the full loop.


@pytest.fixture(scope="session")
def wandb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the shared train server's Weights & Biases runs go (offline)."""
    return tmp_path_factory.mktemp("wandb")


@pytest.fixture(scope="session")
def shared_train_server(
    tiny_model_dir: Path, tmp_path_factory, wandb_dir: Path
) -> Iterator[CogServer]:
    env = {
        "BASE_MODEL": str(tiny_model_dir),
        "BASE_MODEL_CACHE": str(tmp_path_factory.mktemp("cache")),
        # Weights & Biases, for the trainings given a key: offline, into a folder of its own
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(wandb_dir),
    }
    with cog_server(PROJECT_DIR, "train", env) as server:
        assert server.status == "READY", server.log_tail()
        yield server


@pytest.fixture(scope="session")
def served_data(facts_file: Path, tmp_path_factory) -> Iterator[str]:
    """The facts file and a broken file, served on loopback; yields the base URL."""
    folder = tmp_path_factory.mktemp("served")
    shutil.copy(facts_file, folder / "facts.jsonl")
    (folder / "broken.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    with serve_directory(folder) as (url, _):
        yield url


def decode_weights(data_uri: str, out: Path) -> Path:
    header, _, payload = data_uri.partition(",")
    assert header.startswith("data:") and header.endswith(";base64")
    out.write_bytes(base64.b64decode(payload))
    return out


@pytest.fixture(scope="session")
def http_trained_weights(shared_train_server, served_data, tmp_path_factory) -> Path:
    """A training over HTTP, its train_data an http URL on loopback; returns the weights."""
    shared_train_server.wait_ready()
    body = {"input": {"train_data": f"{served_data}/facts.jsonl", **FAST_LEARNING}}
    status, result = shared_train_server.post("/trainings", body, timeout=300)
    assert status == 200 and result["status"] == "succeeded", result.get("error")
    logs = result["logs"]
    assert "train: 16 rows" in logs and "step 24/24" in logs and "tokens/s" in logs
    return decode_weights(result["output"]["weights"], tmp_path_factory.mktemp("w") / "w.tar")
