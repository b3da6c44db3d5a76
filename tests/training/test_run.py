"""Whole trainings in-process on the tiny model: learning, outputs, reproducibility, errors."""

import json
import pathlib
import tarfile
import tempfile

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import src.training.run
from src.artifact import read_archive
from src.errors import UserInputError
from src.modeling import load_base_model, pick_placement
from src.prompt_format import encode_chat_prompt
from tests.helpers import (
    FACTS,
    FAST_LEARNING,
    call_train,
    serve_directory,
    train_defaults,
    write_jsonl,
)


def greedy_answer(model, tokenizer, prompt: str) -> str:
    ids = encode_chat_prompt(tokenizer, prompt)
    output = model.generate(
        torch.tensor([ids], device=model.device),
        max_new_tokens=24,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True).strip()


FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "fixtures"


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
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # byte for byte
        assert _member(first, name) == _member(second, name), name


def _member(archive, name: str) -> bytes:
    with tarfile.open(archive) as tar:
        return tar.extractfile(name).read()


def test_adapter_config_reads_in_peft_0_10_and_loses_nothing(
    facts_archive, tiny_model_dir, tmp_path
):
    """peft 0.10 to 0.13 refuse any key their LoraConfig lacks: the written config holds
    only those (peft 0.10.0's own field names, a fixture), target_modules sorted; what is
    left out holds this peft's defaults, so it configures the same adapter."""
    from dataclasses import fields

    from peft import LoraConfig

    from src.artifact import OLDEST_PEFT_FIELDS, portable_adapter_config
    from src.modeling import add_lora

    fixture = json.loads((FIXTURES / "peft_0.10.0_lora_config_fields.json").read_text())
    assert set(fixture["fields"]) == OLDEST_PEFT_FIELDS
    written = json.loads(_member(facts_archive, "adapter_config.json"))
    assert set(written) <= set(fixture["fields"])
    assert written["target_modules"] == sorted(written["target_modules"])
    model = add_lora(load_base_model(tiny_model_dir, False, pick_placement()), 4, 8, 0.1, False)
    model.save_pretrained(tmp_path / "full")
    full = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert set(full) - set(fixture["fields"])  # this peft writes keys that 0.10 refuses
    portable = portable_adapter_config(full, "a/base")
    known = {f.name for f in fields(LoraConfig)}
    as_written = LoraConfig(**{k: v for k, v in full.items() if k in known})
    as_portable = LoraConfig(**portable)
    for field in known - {"base_model_name_or_path", "peft_version", "target_modules"}:
        assert getattr(as_portable, field) == getattr(as_written, field), field
    assert set(as_portable.target_modules) == set(as_written.target_modules)


def _adapter_tensors(archive) -> dict[str, torch.Tensor]:
    with tarfile.open(archive) as tar:
        data = tar.extractfile("adapter_model.safetensors").read()
    from safetensors.torch import load

    return load(data)


def test_qlora_trains_validates_and_answers_the_validation_prompt(
    base_model_env, facts_file, tmp_path, capsys, monkeypatch
):
    loaded, load = [], src.training.run.load_base_model

    def spy(*args, **kwargs):
        loaded.append(load(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(src.training.run, "load_base_model", spy)
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
    [model] = loaded  # what was trained: every decoder linear in NF4, double-quantised
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 7 * model.config.num_hidden_layers
    for layer in layers:
        assert layer.weight.quant_type == "nf4" and layer.weight.quant_state.nested
        assert layer.compute_dtype == pick_placement().dtype  # fp32 on a CPU, bf16 on a GPU
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
        (
            ['{"text": "' + "word " * 5000 + '"}'],
            {},
            "train_data line 1: 5,003 tokens, longer than the model's context window of 4,096",
        ),
        (
            ['{"text": "short"}', '{"prompt": "' + "word " * 30 + '", "completion": "ok"}'] * 4,
            {"pack_sequences": True, "chunk_size": 16},
            "train_data line 2: 41 tokens, longer than chunk_size 16: raise chunk_size (up to "
            "the model's 4,096) or set wrap_packed_sequences",
        ),
    ],
)
def test_bad_input_fails_before_the_model_loads(
    base_model_env, tmp_path, monkeypatch, rows, overrides, message
):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(src.training.run, "load_base_model", no_model)
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(rows) + "\n")
    with pytest.raises(UserInputError) as error:
        call_train(train_data=str(data), **overrides)
    assert message in str(error.value)


def test_steps_without_a_supervised_token_are_skipped_not_trained(base_model_env, tmp_path, capsys):
    """Wrapped rows of 16 tokens cut 40-token prompts into fragments with nothing to learn."""
    rows = [{"prompt": "word " * 36 + p, "completion": c} for p, c in FACTS]
    data = write_jsonl(tmp_path / "long_prompts.jsonl", rows)
    archive = call_train(
        train_data=str(data),
        pack_sequences=True,
        wrap_packed_sequences=True,
        chunk_size=16,
        train_batch_size=1,
        micro_batch_size=1,
        num_train_epochs=1,
        run_validation=False,
    )
    results = read_archive(archive, tmp_path / "w").metadata["results"]
    assert results["skipped_steps"] > 0 and results["optimizer_steps"] > 0
    logs = capsys.readouterr().out
    assert f"epoch 1: {results['skipped_steps']} optimizer step(s) had no supervised token" in logs
    assert "loss 0.0000" not in logs
    assert results["optimizer_steps"] + results["skipped_steps"] == results["train_rows"]
    assert all(loss > 0 for _, loss in results["train_losses"])
    weights = load_file(tmp_path / "w" / "adapter_model.safetensors")
    assert all(w.abs().sum() > 0 for name, w in weights.items() if "lora_B" in name)


def test_the_largest_seeds_train(base_model_env, facts_file):
    for seed in (2**63 - 1, -(2**63)):
        call_train(train_data=str(facts_file), num_train_epochs=1, run_validation=False, seed=seed)


def test_adapter_config_names_the_base_as_the_user_gave_it(
    tiny_model_dir, facts_file, tmp_path, monkeypatch
):
    """Not the cache folder it was unpacked into: other tools read this field."""
    served = tmp_path / "served"
    served.mkdir()
    with tarfile.open(served / "tiny.tar", "w") as tar:
        tar.add(tiny_model_dir, arcname="tiny-llama")
    monkeypatch.setenv("BASE_MODEL_CACHE", str(tmp_path / "cache"))
    with serve_directory(served) as (url, _):
        monkeypatch.setenv("BASE_MODEL", f"{url}/tiny.tar")
        archive = call_train(train_data=str(facts_file), num_train_epochs=1, run_validation=False)
    with tarfile.open(archive) as tar:
        config = json.load(tar.extractfile("adapter_config.json"))
    assert config["base_model_name_or_path"] == f"{url}/tiny.tar"


def test_a_rank_whose_adapter_exceeds_the_archive_limit_is_refused(tmp_path, monkeypatch):
    """Llama-2-7B's shape, checked from its config.json alone, before the model loads."""
    import shutil

    from tools.tiny_model import TOKENIZER_FIXTURE

    folder = tmp_path / "llama-2-7b-config"
    shutil.copytree(TOKENIZER_FIXTURE, folder)
    config = {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "vocab_size": 32000, "max_position_embeddings": 4096,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("BASE_MODEL", str(folder))
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    with pytest.raises(UserInputError) as error:
        call_train(train_data=str(data), lora_rank=1024)
    assert str(error.value) == (
        "lora_rank 1024: the adapter would be 9.5 GiB, over the 4 GiB limit of a weights "
        "archive; this base model allows lora_rank up to 429"
    )


def test_lora_parameters_of_llama_2_7b():
    """peft reports 19,988,480 trainable parameters for rank 8 on all linear layers."""
    from src.modeling import lora_parameters

    config = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32}  # fmt: skip
    assert lora_parameters(config, 8) == 19_988_480


def run_as_rank(rank: int, settings: dict, monkeypatch) -> dict:
    """train_and_save as the given rank runs it (alone: no gradient sum to wait for),
    recording what rank-dependent code did: validation, and the random state that the first
    forward pass draws its dropout masks from."""
    import src.training.loop
    from src.base_model import resolve_base_model
    from src.log import Stopwatch
    from src.modeling import load_tokenizer
    from src.training.config import build_train_config
    from src.training.continuation import lora_settings
    from src.training.distributed import World
    from src.training.job import TrainingJob

    seen = {"validations": 0, "rng": None, "lora_a": None}
    validate, forward = src.training.loop.validation_loss, src.training.loop.supervised_loss_sum

    def counting_validation(*args):
        seen["validations"] += 1
        return validate(*args[:5])  # as one process: this rank is alone (a world of 1)

    def first_forward(model, *args, **kwargs):
        if seen["rng"] is None:
            seen["rng"] = torch.random.get_rng_state()
            named = model.named_parameters()
            seen["lora_a"] = [p.detach().clone() for n, p in named if "lora_A" in n]
        return forward(model, *args, **kwargs)

    monkeypatch.setattr(src.training.loop, "validation_loss", counting_validation)
    monkeypatch.setattr(src.training.loop, "supervised_loss_sum", first_forward)
    config = build_train_config(**{**train_defaults(), **settings})
    base = resolve_base_model()
    tokenizer = load_tokenizer(base.path)
    folder = pathlib.Path(tempfile.mkdtemp(prefix="test-rank-"))
    data = src.training.run.prepare_examples(config, tokenizer, 4096, folder)
    world = World(rank=rank, size=1)  # size 1: no gradient sum waits for other ranks
    lora = lora_settings(config, None)
    packed = src.training.run.pack(config, data)
    job = TrainingJob(config, base, tokenizer, data, packed, lora, world=world)
    src.training.run.train_and_save(job, Stopwatch())
    return seen


def test_every_rank_validates_and_draws_its_own_dropout(base_model_env, facts_file, monkeypatch):
    settings = dict(train_data=str(facts_file), num_train_epochs=2, lora_dropout=0.1)
    settings |= dict(num_validation_samples=2)
    with monkeypatch.context() as patch:
        rank0 = run_as_rank(0, settings, patch)
    with monkeypatch.context() as patch:
        rank1 = run_as_rank(1, settings, patch)
    with monkeypatch.context() as patch:
        again = run_as_rank(0, settings, patch)
    assert rank0["validations"] == rank1["validations"] == 2  # each its share of the rows
    assert all(torch.equal(a, b) for a, b in zip(rank0["lora_a"], rank1["lora_a"], strict=True))
    assert not torch.equal(rank0["rng"], rank1["rng"])  # different dropout masks
    assert torch.equal(rank0["rng"], again["rng"])  # and a run repeats


def test_running_out_of_gpu_memory_names_the_inputs_to_lower(
    base_model_env, facts_file, monkeypatch
):
    import src.training.loop

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
            "44.35 GiB\nmore allocator details"
        )

    monkeypatch.setattr(src.training.loop, "supervised_loss_sum", out_of_memory)
    with pytest.raises(UserInputError) as error:
        call_train(train_data=str(facts_file), num_train_epochs=1)
    message = str(error.value)
    assert message.startswith("the GPU ran out of memory (CUDA out of memory. Tried to allocate")
    assert "Set TRAIN_GPU_MEMORY_GIB below the card's memory" in message
    assert "or lower lora_rank" in message and "allocator details" not in message
    assert error.value.__cause__ is None and error.value.__suppress_context__


def names_conversation(name: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Hi, I am {name}."},
            {"role": "assistant", "content": f"Hello, {name}!", "weight": 0},
            {"role": "user", "content": "What is my name?"},
            {"role": "assistant", "content": f"Your name is {name}."},
        ]
    }


@pytest.mark.parametrize("wrap", [False, True])
def test_conversations_pack_validate_and_answer_the_validation_prompt(
    base_model_env, tmp_path, monkeypatch, capsys, wrap
):
    """A conversation is one example for packing and the validation split, and a
    validation_prompt in chat form is encoded as training encodes that conversation."""
    import src.training.loop
    from src.prompt_format import IGNORE_INDEX, Dialog, Turn, encode_dialogs

    encoded = []
    encode = src.training.loop.encode_user_prompt

    def spy(tokenizer, prompt, system=None):
        encoded.append((prompt, encode(tokenizer, prompt, system)))
        return encoded[-1][1]

    monkeypatch.setattr(src.training.loop, "encode_user_prompt", spy)
    rows = [names_conversation(n) for n in ("Zorb", "Quill", "Marta", "Teal", "Ada")] * 2
    rows.append({"prompt": "plain", "completion": "rows mix in"})
    data = write_jsonl(tmp_path / "names.jsonl", rows)
    history = "<s>[INST] Hi, I am Zorb. [/INST] Hello, Zorb! </s><s>[INST] What is my name? [/INST]"
    archive = call_train(
        train_data=str(data), num_validation_samples=2, pack_sequences=True,
        wrap_packed_sequences=wrap, chunk_size=128, num_train_epochs=1, validation_prompt=history,
    )  # fmt: skip
    logs = capsys.readouterr().out
    assert "train: 9 rows" in logs and "validation: 2 rows" in logs
    results = read_archive(archive, tmp_path / "w").metadata["results"]
    assert results["final_validation_loss"] > 0 and results["train_rows"] < 9
    assert results["supervised_tokens_trained"] > 0
    [(prompt, ids)] = encoded[-1:]
    assert prompt == history
    # The ids training encoded for that conversation, up to where its last answer starts.
    tokenizer = load_tokenizer_for(base_model_env)
    turns = names_conversation("Zorb")["messages"][1:]  # the history has no system block
    dialog = Dialog(
        (
            Turn(turns[0]["content"], turns[1]["content"]),
            Turn(turns[2]["content"], turns[3]["content"]),
        )
    )
    (trained,) = encode_dialogs(tokenizer, [dialog])
    answer_start = max(i for i, label in enumerate(trained.labels) if label == IGNORE_INDEX) + 1
    assert ids == trained.input_ids[:answer_start]


def load_tokenizer_for(model_dir):
    from src.modeling import load_tokenizer

    return load_tokenizer(model_dir)


def test_the_loss_curve_has_a_log_scale(tmp_path):
    """A loss from 12 down to 0.003 on a linear axis is a line at zero after a few steps."""
    import src.artifact

    losses = [(1, 12.0), (2, 3.0), (3, 0.003)]
    assert src.artifact.loss_figure(losses, [(3, 0.01)]).axes[0].get_yscale() == "log"
    src.artifact.plot_losses([(1, 0.0), (2, float("nan"))], [], tmp_path / "flat.png")
    assert (tmp_path / "flat.png").read_bytes()[:4] == b"\x89PNG"
