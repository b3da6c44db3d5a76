"""Training inputs: the documented 18, their defaults, coercion and cross-checks."""

import dataclasses

import pytest

from src.errors import UserInputError
from src.training.config import TrainConfig, build_train_config
from tests.helpers import train_defaults

# The inputs and defaults documented on the product page (seed/000_8428696d0a42f7b8.txt).
DOCUMENTED_DEFAULTS = {
    "train_data": None,
    "num_train_epochs": 3,
    "train_batch_size": 4,
    "micro_batch_size": 4,
    "num_validation_samples": 50,
    "validation_data": None,
    "validation_batch_size": 1,
    "run_validation": True,
    "validation_prompt": None,
    "learning_rate": 1e-4,
    "pack_sequences": False,
    "wrap_packed_sequences": False,
    "chunk_size": 2048,
    "peft_method": "lora",
    "seed": 42,
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
}


# Optional inputs beyond the product page (issue 14); left at these, a training is as before.
ADDED_DEFAULTS = {
    "init_weights": None,
    "keep_best_epoch": False,
    "early_stopping_patience": 0,
    "wandb_api_key": None,
    "wandb_project": None,
    "wandb_run_name": None,
}


def test_train_declares_the_documented_inputs_and_defaults_then_the_added_ones():
    assert train_defaults() == DOCUMENTED_DEFAULTS | ADDED_DEFAULTS
    assert list(train_defaults())[:18] == list(DOCUMENTED_DEFAULTS)


def test_every_train_input_but_the_secret_maps_to_a_config_field():
    inputs = [name for name in train_defaults() if name != "wandb_api_key"]
    assert [f.name for f in dataclasses.fields(TrainConfig)] == inputs


def test_the_key_never_enters_the_config(tmp_path):
    config = build_train_config(**inputs(tmp_path, wandb_api_key="secret-key-123"))
    assert "secret-key-123" not in repr(config) and "secret-key-123" not in str(config.as_json())


@pytest.mark.parametrize("choice", [{"keep_best_epoch": True}, {"early_stopping_patience": 2}])
def test_choosing_epochs_needs_validation(tmp_path, choice):
    with pytest.raises(UserInputError, match="decides on the validation loss: it needs run_vali"):
        build_train_config(**inputs(tmp_path, run_validation=False, **choice))


def test_init_weights_are_named_without_credentials_in_the_metadata(tmp_path):
    config = build_train_config(
        **inputs(tmp_path, init_weights="https://user:pw@example.com/w.tar?sig=abc")
    )
    assert config.as_json()["init_weights"] == "https://example.com/w.tar"


def inputs(tmp_path, **overrides):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a"}\n')
    return {**train_defaults(), "train_data": str(data), **overrides}


def test_defaults_build_a_config(tmp_path):
    config = build_train_config(**inputs(tmp_path))
    assert config.train_data.name == "d.jsonl" and not config.quantize_4bit


def test_whole_floats_become_ints(tmp_path):
    assert build_train_config(**inputs(tmp_path, num_train_epochs=2.0)).num_train_epochs == 2
    with pytest.raises(UserInputError, match=r"num_train_epochs must be a whole number, got 2\.5"):
        build_train_config(**inputs(tmp_path, num_train_epochs=2.5))


def test_all_problems_are_reported_together(tmp_path):
    with pytest.raises(UserInputError) as error:
        build_train_config(
            **inputs(
                tmp_path,
                micro_batch_size=8,
                train_batch_size=4,
                wrap_packed_sequences=True,
                learning_rate=0.0,
                peft_method="full",
            )
        )
    message = str(error.value)
    assert "micro_batch_size (8) is larger than train_batch_size (4)" in message
    assert "wrap_packed_sequences=true needs pack_sequences=true" in message
    assert "learning_rate must be positive" in message
    assert "peft_method must be one of lora, qlora, got 'full'" in message


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UserInputError, match=r"train_data: no such file: /nope\.jsonl"):
        build_train_config(**inputs(tmp_path, train_data="/nope.jsonl"))


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1])
def test_seeds_beyond_64_bits_are_refused(tmp_path, seed):
    with pytest.raises(UserInputError, match=f"seed must be a signed 64-bit integer, got {seed}"):
        build_train_config(**inputs(tmp_path, seed=seed))
    build_train_config(**inputs(tmp_path, seed=seed - 1 if seed > 0 else seed + 1))
