"""cog.yaml against Cog's own config schema (pkg/config/data/config_schema_v1.0.json, v0.23)."""

import json
import re
from pathlib import Path

import jsonschema
import yaml

PROJECT_DIR = Path(__file__).resolve().parent.parent
SCHEMA = Path(__file__).parent / "fixtures" / "cog_config_schema_v1.0.json"


def cog_yaml() -> dict:
    return yaml.safe_load((PROJECT_DIR / "cog.yaml").read_text())


def test_cog_yaml_is_valid():
    jsonschema.validate(cog_yaml(), json.loads(SCHEMA.read_text()))


def test_cog_yaml_declares_gpu_python_and_both_entry_points():
    config = cog_yaml()
    assert config["build"]["gpu"] is True
    assert config["build"]["python_requirements"] == "requirements.txt"
    assert config["run"] == "predict.py:Predictor" and config["train"] == "train.py:train"
    assert "build-essential" in config["build"]["system_packages"]  # Triton's compiler


def test_the_image_bakes_in_no_concurrency():
    """The slots are declared on predict.py's `run` (@cog.concurrent), not in the image: one
    image serves both modes, and a train server with COG_MAX_CONCURRENCY > 1 fails setup
    (its `train()` is synchronous)."""
    config = cog_yaml()
    assert "concurrency" not in config
    assert "COG_MAX_CONCURRENCY" not in json.dumps(config.get("environment", []))
    import inspect

    from predict import Predictor
    from src.serving.serving_plan import DEFAULT_SLOTS

    assert inspect.isasyncgenfunction(Predictor.run)
    assert Predictor.run.__cog_concurrent_max__ == DEFAULT_SLOTS == 16


def test_every_requirement_is_pinned_and_torch_matches_the_install_command():
    lines = [
        line.strip()
        for line in (PROJECT_DIR / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[\w.+]+", line) for line in lines), lines
    assert "torch==2.13.0" in lines
    assert "torch==2.13.0" in (PROJECT_DIR / "Makefile").read_text()


def pinned(name: str) -> str:
    for line in (PROJECT_DIR / "requirements.txt").read_text().splitlines():
        if line.startswith(f"{name}=="):
            return line.split("==")[1]
    raise AssertionError(f"{name} is not pinned")


def test_the_image_runs_the_cog_and_coglet_the_tests_ran():
    """Cog installs its own SDK over requirements.txt unless build.sdk_version pins it, and
    resolves coglet at build time unless COGLET_WHEEL names a version."""
    assert cog_yaml()["build"]["sdk_version"] == pinned("cog")
    makefile = (PROJECT_DIR / "Makefile").read_text()
    coglet = f"COGLET_WHEEL=pypi:{pinned('coglet')}"
    assert re.search(rf"^image:\n\t{coglet} cog build$", makefile, re.M)
    assert re.search(rf"^push:.*\n\tCOG_MODEL=\$\(MODEL\) {coglet} cog push$", makefile, re.M)


# The files of meta-llama/Llama-2-7b-chat-hf at the revision Cog imports.
LLAMA_2_7B_CHAT_FILES = [
    ".gitattributes", "LICENSE.txt", "README.md", "Responsible-Use-Guide.pdf",
    "USE_POLICY.md", "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors", "model.safetensors.index.json",
    "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
    "pytorch_model.bin.index.json", "special_tokens_map.json", "tokenizer.json",
    "tokenizer.model", "tokenizer_config.json",
]  # fmt: skip


def test_the_base_model_travels_as_managed_weights():
    """cog.yaml mounts the default base where src/base_model.py looks for it first: the
    safetensors, configs and tokenizer, never the pickled copies; and a model to push to."""
    import fnmatch

    from src.base_model import DEFAULT_BASE_MODEL, MANAGED_WEIGHTS

    config = cog_yaml()
    assert config["model"] and "image" not in config  # Cog: weights require 'model'
    [weights] = config["weights"]
    assert weights["source"]["uri"] == f"hf://{DEFAULT_BASE_MODEL}"
    assert weights["target"] == str(MANAGED_WEIGHTS)
    include = weights["source"]["include"]
    imported = {f for f in LLAMA_2_7B_CHAT_FILES if any(fnmatch.fnmatch(f, p) for p in include)}
    assert imported == {
        "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json",
        "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    }  # fmt: skip
    ignored = (PROJECT_DIR / ".dockerignore").read_text().split()
    assert "weights/" in ignored and ".venv/" in ignored
    text = (PROJECT_DIR / "cog.yaml").read_text()
    assert not re.search(r"hf_[A-Za-z0-9]{20,}|HF_TOKEN=|X-Amz-Signature", text)  # no token
