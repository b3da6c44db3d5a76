"""The chat model behind predict.py, in-process: weights sources, adapter swaps, QLoRA fidelity."""

import base64
import io
import json
import os
import shutil
import tarfile
import time

import pytest
import torch

import src.artifact
import src.serving.chat
from src.adapters import WeightsStore
from src.errors import UserInputError
from src.prompt_format import encode_chat_prompt
from src.serving.chat import ChatModel, build_chat_request
from tests.helpers import (
    FACTS,
    FAST_LEARNING,
    GREEDY_INPUTS,
    OTHER_FACTS,
    call_train,
    serve_directory,
    served_logits,
    write_jsonl,
)

PROMPT, ANSWER = FACTS[0]


def ask(model: ChatModel, prompt: str = PROMPT, **overrides) -> str:
    inputs = {**GREEDY_INPUTS, "prompt": prompt, **overrides}
    return "".join(model.chat(build_chat_request(**inputs)))


@pytest.fixture(scope="module")
def chat_model(base_model_env_module, facts_archive) -> ChatModel:
    return ChatModel(str(facts_archive))


def test_trained_weights_answer_the_trained_prompts(chat_model):
    for prompt, completion in FACTS:
        assert ask(chat_model, prompt) == completion


def test_weights_as_url_and_data_uri(base_model_env, facts_archive, tmp_path):
    shutil.copy(facts_archive, tmp_path / "weights.tar")
    with serve_directory(tmp_path) as (url, requested):
        assert ask(ChatModel(f"{url}/weights.tar")) == ANSWER
    assert requested == ["/weights.tar"]
    data_uri = (
        "data:application/x-tar;base64," + base64.b64encode(facts_archive.read_bytes()).decode()
    )
    assert ask(ChatModel(data_uri)) == ANSWER


def test_replicate_weights_swap_and_back(
    chat_model, other_facts_archive, facts_archive, monkeypatch
):
    other = str(other_facts_archive)
    assert ask(chat_model, replicate_weights=other) == OTHER_FACTS[0][1]
    assert ask(chat_model) == ANSWER
    work = []  # a warm swap is a flag: nothing unpacked or loaded again
    for name in ("unpack",):
        monkeypatch.setattr(chat_model.store, name, lambda *a, **k: work.append(a))
    monkeypatch.setattr(chat_model, "_load_adapter", lambda *a: work.append(a))
    assert ask(chat_model, replicate_weights=other) == OTHER_FACTS[0][1]
    assert ask(chat_model, replicate_weights=str(facts_archive)) == ANSWER
    assert work == []
    assert ask(chat_model, FACTS[3][0]) == FACTS[3][1]


def test_no_weights_serves_the_base(base_model_env, facts_archive):
    """Also after an adapter was used: the plain base then runs with the adapters off."""
    model = ChatModel(None)
    base_answer = ask(model)
    assert base_answer != ANSWER
    assert ask(model, replicate_weights=str(facts_archive)) == ANSWER
    assert ask(model) == base_answer


def test_the_least_recent_adapter_is_dropped_and_comes_back(
    base_model_env, facts_archive, other_facts_archive, tmp_path, monkeypatch
):
    """Beyond the cache's limit the least recent adapter leaves the model and the disk; the
    setup weights stay, whatever the limit."""
    import src.serving.chat

    monkeypatch.setattr(src.serving.chat, "MAX_LOADED_ADAPTERS", 2)
    third = tmp_path / "third.tar"
    shutil.copy(other_facts_archive, third)
    model = ChatModel(str(facts_archive))
    unpacked = lambda: sorted(p.name for p in model.store.root.iterdir())  # noqa: E731
    for _ in range(2):
        assert ask(model, replicate_weights=str(other_facts_archive)) == OTHER_FACTS[0][1]
        assert ask(model, replicate_weights=str(third)) == OTHER_FACTS[0][1]  # drops `other`
        assert len(model.loaded) == 2 and len(unpacked()) == 2
        assert model.setup_name in model.loaded
        assert ask(model) == ANSWER  # the setup weights were never dropped
    assert ask(model, replicate_weights=str(other_facts_archive)) == OTHER_FACTS[0][1]


def test_seeded_sampling_is_reproducible(chat_model):
    settings = dict(temperature=1.5, top_p=0.9, top_k=50, seed=123, prompt="Tell me a story.")
    first = ask(chat_model, **settings)
    assert ask(chat_model, **settings) == first
    assert ask(chat_model, **{**settings, "seed": 124}) != first


def test_stop_sequences(chat_model):
    assert ask(chat_model, stop_sequences="Quill,zzz") == "The capital of Zorbia is "


def tokens_produced(model: ChatModel, **overrides) -> int:
    from src.serving.generation import GenerationStats

    stats = GenerationStats()
    list(model.chat(build_chat_request(**{**GREEDY_INPUTS, "prompt": PROMPT, **overrides}), stats))
    return stats.output_tokens


def test_min_new_tokens_is_the_exact_floor(chat_model, tokenizer):
    from src.prompt_format import encode_texts, render_completion

    answer = len(encode_texts(tokenizer, [render_completion(ANSWER)])[0])
    assert tokens_produced(chat_model) == answer  # the trained completion, then EOS
    longer = answer + 7
    assert tokens_produced(chat_model, min_new_tokens=longer, max_new_tokens=longer) == longer
    assert tokens_produced(chat_model, min_new_tokens=longer, max_new_tokens=32) >= longer


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63)])
def test_every_64_bit_seed_samples(chat_model, seed):
    assert ask(chat_model, seed=seed, temperature=1.0) == ask(
        chat_model, seed=seed, temperature=1.0
    )


def test_seeds_beyond_64_bits_are_refused():
    with pytest.raises(UserInputError, match="seed must be a signed 64-bit integer"):
        build_chat_request(**{**GREEDY_INPUTS, "prompt": PROMPT, "seed": 2**63})


def test_prompt_longer_than_the_context_is_refused(chat_model, tokenizer, capsys):
    with pytest.raises(UserInputError, match="leaves no room in the model's context window"):
        ask(chat_model, prompt="llama " * 3000)
    long_prompt = "llama " * 2040
    room = 4096 - len(encode_chat_prompt(tokenizer, long_prompt))
    assert 0 < room < 20
    ask(chat_model, prompt=long_prompt, max_new_tokens=200, min_new_tokens=200)
    assert f"max_new_tokens capped from 200 to {room}" in capsys.readouterr().out


def test_bad_inputs_are_reported_together():
    with pytest.raises(UserInputError) as error:
        build_chat_request(
            **{
                **GREEDY_INPUTS,
                "prompt": " ",
                "prompt_template": "no placeholder",
                "max_new_tokens": 2.5,
                "repetition_penalty": 1e-40,
            }
        )
    message = str(error.value)
    assert "max_new_tokens must be a whole number, got 2.5" in message
    assert "repetition_penalty must be 0 or 1 (off) or at least 0.01, got 1e-40" in message
    assert "prompt is empty" in message and "prompt_template must contain {prompt}" in message


def test_weights_for_another_base_are_refused(base_model_env, facts_archive, tmp_path):
    folder = tmp_path / "x"
    with tarfile.open(facts_archive) as tar:
        tar.extractall(folder, filter="data")
    metadata = folder / src.artifact.METADATA
    metadata.write_text(metadata.read_text().replace('"hidden_size": 256', '"hidden_size": 4096'))
    with tarfile.open(tmp_path / "w.tar", "w") as tar:
        for item in folder.iterdir():
            tar.add(item, arcname=item.name)
    with pytest.raises(UserInputError, match=r"differs from this server's base .* in hidden_size"):
        ChatModel(str(tmp_path / "w.tar"))


def _evil_archive(path, build) -> str:
    with tarfile.open(path, "w") as tar:
        build(tar)
    return str(path)


def _add_bytes(tar, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    tar.addfile(member, io.BytesIO(data))


def _symlink(tar) -> None:
    member = tarfile.TarInfo("adapter_model.safetensors")
    member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tar.addfile(member)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda tar: _add_bytes(tar, "../../escaped.txt", b"x"), "unsafe path"),
        (lambda tar: _add_bytes(tar, "/tmp/escaped-abs.txt", b"x"), "unsafe path"),
        (_symlink, "only files and folders are allowed"),
        (
            lambda tar: [
                _add_bytes(tar, n, b"{}")
                for n in ("adapter_config.json", "adapter_model.bin", "training_metadata.json")
            ],
            "adapter_model.bin is not a plain dictionary of tensors",
        ),
        (lambda tar: _add_bytes(tar, "adapter_model.safetensors", b"x" * 4096), "exceeds"),
    ],
)
def test_malicious_archives_are_refused(tmp_path, monkeypatch, build, message):
    monkeypatch.setattr(src.artifact, "MAX_ARCHIVE_BYTES", 1024)
    archive = _evil_archive(tmp_path / "evil.tar", build)
    store = WeightsStore(tmp_path / "a" / "b" / "weights")
    with pytest.raises(UserInputError, match=message):
        store.unpack(archive)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "evil.tar"]
    assert all(store.root in p.parents for p in written), written
    assert not any("escaped" in p.name for p in written)


def test_malicious_weights_fail_setup_clearly(base_model_env, tmp_path):
    archive = _evil_archive(tmp_path / "evil.tar", _symlink)
    with pytest.raises(UserInputError, match="only files and folders are allowed"):
        ChatModel(archive)


def test_a_pickle_beside_safetensors_is_never_read(facts_archive, tmp_path, monkeypatch):
    with tarfile.open(facts_archive) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    (tmp_path / "x" / "adapter_model.bin").write_bytes(b"pickle")
    with tarfile.open(tmp_path / "both.tar", "w") as tar:
        for item in (tmp_path / "x").iterdir():
            tar.add(item, arcname=item.name)

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", refuse)
    adapter = WeightsStore(tmp_path / "store").unpack(str(tmp_path / "both.tar"))
    assert not (adapter.folder / "adapter_model.bin").exists()


def test_a_history_in_chat_form_is_used_as_is_and_the_logs_say_so(chat_model, capsys):
    history = f"<s>[INST] {PROMPT} [/INST]"
    assert ask(chat_model, history, system_prompt="You are a pirate.") == ANSWER
    assert "system_prompt is not added" in capsys.readouterr().out
    ask(chat_model, history, system_prompt="")
    assert "system_prompt is not added" not in capsys.readouterr().out


def metadata_of(archive) -> dict:
    with tarfile.open(archive) as tar:
        return json.load(tar.extractfile(src.artifact.METADATA))


def test_an_adapter_is_prompted_as_it_was_trained_by_default(base_model_env, tmp_path, capsys):
    """Rows trained with a system prompt: a request without one gets it, as does the
    validation_prompt during training; "" still means no <<SYS>> block."""
    rows = [{"prompt": p, "completion": c, "system": "You are terse."} for p, c in FACTS] * 4
    data = write_jsonl(tmp_path / "terse.jsonl", rows)
    archive = call_train(train_data=str(data), **{**FAST_LEARNING, "validation_prompt": PROMPT})
    out = capsys.readouterr().out
    assert "validation_prompt: system prompt 'You are terse.', as the adapter was trained" in out
    metadata = metadata_of(archive)
    assert metadata["prompt_format"]["system_prompt"] == {
        "text": "You are terse.", "rows": 16, "chat_rows": 16, "distinct": 1
    }  # fmt: skip
    assert metadata["results"]["validation_answers"][-1] == ANSWER
    model = ChatModel(str(archive))
    capsys.readouterr()
    assert ask(model, system_prompt=None) == ANSWER
    assert (
        "system prompt: 'You are terse.', as the adapter was trained (all 16 of its chat rows)"
        in capsys.readouterr().out
    )
    assert first_logits(model, None).equal(first_logits(model, "You are terse."))
    assert not first_logits(model, None).equal(first_logits(model, ""))
    ask(model, system_prompt="")
    assert "system prompt: none, the request's empty one" in capsys.readouterr().out


def first_logits(model: ChatModel, system_prompt: str | None) -> torch.Tensor:
    """The first new token's logits of a request with `system_prompt`, as served."""
    return served_logits(model, PROMPT, system_prompt=system_prompt)


def test_without_a_record_or_chat_rows_the_base_default_is_used(
    base_model_env, facts_archive, tmp_path, capsys
):
    """The plain base, an adapter of text rows only, and an archive from before the record
    get the base model's usual system prompt; trained without one, an adapter gets none."""
    from src.prompt_format import DEFAULT_SYSTEM_PROMPT

    model = ChatModel(str(facts_archive))  # prompt/completion rows without a system prompt
    capsys.readouterr()
    assert ask(model, system_prompt=None) == ANSWER
    assert "system prompt: none, as the adapter was trained" in capsys.readouterr().out
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": c} for _, c in FACTS] * 4)
    text_only = call_train(train_data=str(texts), **{**FAST_LEARNING, "num_train_epochs": 1})
    older = tmp_path / "older.tar"
    with tarfile.open(facts_archive) as source, tarfile.open(older, "w") as target:
        for member in source.getmembers():
            content = source.extractfile(member).read()
            if member.name == src.artifact.METADATA:
                metadata = json.loads(content)
                del metadata["prompt_format"]["system_prompt"]
                content = json.dumps(metadata).encode()
                member.size = len(content)
            target.addfile(member, io.BytesIO(content))
    expected = repr(DEFAULT_SYSTEM_PROMPT)
    for weights, why in (
        (None, "the base model's default (no adapter)"),
        (str(text_only), "the base model's default (the adapter was trained on text rows"),
        (str(older), "the base model's default (the adapter's archive does not record"),
    ):
        ask(model, system_prompt=None, replicate_weights=weights)
        if weights is None:
            ask(ChatModel(None), system_prompt=None)
        assert f"system prompt: {expected}, {why}" in capsys.readouterr().out


def test_a_weights_file_replaced_at_its_path_is_loaded_anew(
    base_model_env, facts_archive, other_facts_archive, tmp_path
):
    """Adapters are named by what the store tells apart (path, size, modification time);
    the setup weights are identified once, so deleting their file breaks nothing."""
    setup, swapped = tmp_path / "setup.tar", tmp_path / "swapped.tar"
    shutil.copy(facts_archive, setup)
    shutil.copy(facts_archive, swapped)
    model = ChatModel(str(setup))
    assert ask(model, replicate_weights=str(swapped)) == ANSWER
    shutil.copy(other_facts_archive, swapped)
    os.utime(swapped, ns=(time.time_ns(), time.time_ns() + 10**9))  # surely another mtime
    assert ask(model, replicate_weights=str(swapped)) == OTHER_FACTS[0][1]
    setup.unlink()
    assert ask(model) == ANSWER
    assert ask(model, replicate_weights=str(swapped)) == OTHER_FACTS[0][1]
    assert ask(model) == ANSWER
