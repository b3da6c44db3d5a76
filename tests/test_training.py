"""Whole trainings in-process on the tiny model: learning, outputs, reproducibility, errors."""

import json
import tarfile

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import src.training
from src.artifact import read_archive
from src.errors import UserInputError
from src.modeling import load_base_model, pick_placement
from src.prompt_format import encode_chat_prompt
from tests.helpers import FACTS, FAST_LEARNING, call_train, write_jsonl


def greedy_answer(model, tokenizer, prompt: str) -> str:
    ids = encode_chat_prompt(tokenizer, prompt)
    output = model.generate(
        torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    return tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True).strip()


def test_archive_holds_adapter_metadata_and_plot(facts_archive):
    with tarfile.open(facts_archive) as tar:
        assert sorted(tar.getnames()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
            "loss_curve.png",
            "training_metadata.json",
        ]
        metadata = json.load(tar.extractfile("training_metadata.json"))
        assert tar.extractfile("loss_curve.png").read(8) == b"\x89PNG\r\n\x1a\n"
    assert metadata["inputs"]["lora_rank"] == 16 and metadata["peft_method"] == "lora"
    assert metadata["base_model"]["model_type"] == "llama"
    assert metadata["prompt_format"]["name"] == "llama-2-chat"
    results = metadata["results"]
    assert results["optimizer_steps"] == 6 * 4
    assert results["final_train_loss"] < 0.5 < results["train_losses"][0][1]
    assert results["tokens_trained"] == 6 * results["tokens_per_epoch"]


def test_adapter_reproduces_the_trained_completions(
    facts_archive, tiny_model_dir, tokenizer, tmp_path
):
    adapter = read_archive(facts_archive, tmp_path / "weights")
    config = json.loads((adapter.folder / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    base = load_base_model(tiny_model_dir, quantize_4bit=False, placement=pick_placement())
    untrained = [greedy_answer(base, tokenizer, p) for p, _ in FACTS]
    model = PeftModel.from_pretrained(base, adapter.folder).eval()
    for (prompt, completion), before in zip(FACTS, untrained, strict=True):
        assert greedy_answer(model, tokenizer, prompt) == completion != before


def test_same_seed_gives_the_same_adapter(base_model_env, facts_file):
    settings = dict(FAST_LEARNING, num_train_epochs=1, train_data=str(facts_file))
    first, second = call_train(**settings), call_train(**settings)
    other = call_train(**dict(settings, seed=7))
    weights = [_adapter_tensors(path) for path in (first, second, other)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def _adapter_tensors(archive) -> dict[str, torch.Tensor]:
    with tarfile.open(archive) as tar:
        data = tar.extractfile("adapter_model.safetensors").read()
    from safetensors.torch import load

    return load(data)


def test_qlora_trains_validates_and_answers_the_validation_prompt(
    base_model_env, facts_file, tmp_path, capsys
):
    validation = write_jsonl(
        tmp_path / "val.jsonl", [{"prompt": p, "completion": c} for p, c in FACTS]
    )
    archive = call_train(
        train_data=str(facts_file),
        validation_data=str(validation),
        num_validation_samples=3,
        peft_method="qlora",
        num_train_epochs=2,
        learning_rate=3e-3,
        micro_batch_size=2,
        validation_prompt=FACTS[0][0],
    )
    logs = capsys.readouterr().out
    assert "validation: first 3 of 4 rows of validation_data" in logs
    assert "4-bit NF4" in logs
    assert logs.count("validation: epoch") == 2 and logs.count("model answer:") == 2
    metadata = read_archive(archive, tmp_path / "w").metadata
    assert metadata["peft_method"] == "qlora"
    assert len(metadata["results"]["validation_losses"]) == 2
    assert len(metadata["results"]["validation_answers"]) == 2
    assert load_file(tmp_path / "w" / "adapter_model.safetensors")


@pytest.mark.parametrize(
    ("rows", "overrides", "message"),
    [
        (['{"prompt": "p"}'], {}, 'train_data line 1: missing "completion"'),
        (['{"text": "a"}'], {"micro_batch_size": 8}, "micro_batch_size (8) is larger"),
        (
            ['{"text": "a"}'],
            {"pack_sequences": True, "chunk_size": 8192},
            "chunk_size 8192 is larger",
        ),
        (['{"text": "' + "word " * 5000 + '"}'], {}, "train_data line 1: 5003 tokens, longer than"),
    ],
)
def test_bad_input_fails_before_the_model_loads(
    base_model_env, tmp_path, monkeypatch, rows, overrides, message
):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(src.training, "load_base_model", no_model)
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(rows) + "\n")
    with pytest.raises(UserInputError) as error:
        call_train(train_data=str(data), **overrides)
    assert message in str(error.value)
