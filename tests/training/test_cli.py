"""`python -m src.training`: train.py's inputs from a JSON file, checked as Cog checks them,
and a training without Cog (one process here; torchrun nodes in test_data_parallel.py)."""

import json
import tarfile

import pytest

from src.errors import UserInputError
from src.training.cli import main, read_inputs
from tests.helpers import train_defaults


def write(tmp_path, values) -> object:
    path = tmp_path / "inputs.json"
    path.write_text(json.dumps(values))
    return path


def test_inputs_left_out_take_train_py_s_defaults(tmp_path):
    inputs = read_inputs(write(tmp_path, {"train_data": "data.jsonl", "lora_rank": 16}))
    expected = {k: v for k, v in train_defaults().items() if k != "wandb_api_key"}
    assert inputs == {**expected, "train_data": "data.jsonl", "lora_rank": 16}


def test_every_problem_is_named_with_the_file(tmp_path):
    path = write(tmp_path, {
        "num_train_epochs": 0, "learning_rate": 2.0, "peft_method": "dora",
        "wandb_api_key": "secret", "batch": 4,
    })  # fmt: skip
    with pytest.raises(UserInputError) as error:
        read_inputs(path)
    message = str(error.value)
    assert message.startswith(f"Invalid training inputs in {path}:")
    for problem in (
        "unknown input 'batch'",
        "wandb_api_key is not read from a file: set WANDB_API_KEY instead",
        "missing input 'train_data'",
        "num_train_epochs must be at least 1, got 0",  # train.py's ge, as Cog checks it
        "learning_rate must be at most 1.0, got 2.0",
        "peft_method must be one of lora, qlora, got 'dora'",
    ):
        assert problem in message
    assert "secret" not in message


@pytest.mark.parametrize(
    ("text", "problem"),
    [("{", "not JSON"), ("[1]", "a JSON object of train.py's inputs")],
)
def test_a_file_that_is_not_an_object_of_inputs_is_refused(tmp_path, text, problem):
    path = tmp_path / "inputs.json"
    path.write_text(text)
    with pytest.raises(UserInputError, match=problem):
        read_inputs(path)


def test_types_are_checked_as_train_checks_them(tmp_path, capsys, facts_file):
    path = write(tmp_path, {"train_data": str(facts_file), "num_train_epochs": "three"})
    assert main(["--inputs", str(path), "--output", str(tmp_path / "w.tar")]) == 2
    assert "num_train_epochs" in capsys.readouterr().err


def test_the_output_path_is_checked_before_training(tmp_path, capsys, facts_file):
    path = write(tmp_path, {"train_data": str(facts_file)})
    assert main(["--inputs", str(path), "--output", str(tmp_path / "no" / "w.tar")]) == 2
    assert f"no such folder {tmp_path / 'no'}" in capsys.readouterr().err
    assert main(["--inputs", str(path), "--output", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_one_process_trains_from_a_url_and_writes_the_archive(
    base_model_env, facts_file, tmp_path, capsys
):
    """train_data by URL (downloaded as Cog would), the archive at --output."""
    from tests.helpers import serve_directory

    output = tmp_path / "weights.tar"
    with serve_directory(facts_file.parent) as (url, asked):
        path = write(tmp_path, {"train_data": f"{url}/{facts_file.name}", "num_train_epochs": 1})
        assert main(["--inputs", str(path), "--output", str(output)]) == 0
    assert asked == [f"/{facts_file.name}"]
    with tarfile.open(output) as tar:
        metadata = json.load(tar.extractfile("training_metadata.json"))
    assert metadata["inputs"]["num_train_epochs"] == 1
    assert f"weights: {output}" in capsys.readouterr().out
