"""The Llama-2 chat format against Meta's published chat template, token for token."""

import pytest

from src.prompt_format import (
    IGNORE_INDEX,
    encode_chat_examples,
    encode_chat_prompt,
    encode_preformatted,
    encode_text_examples,
    render_user_turn,
)

CASES = [
    ("What is the capital of Zorbia?", "The capital of Zorbia is Quillton.", None),
    ("  Tell me a joke  ", " Why did the llama cross the road? ", "You are a funny assistant."),
    ("Écris un haïku 🦙", "Lama doux\nsur la montagne", "Réponds en français.\nSois bref."),
    ("Line one\nline two", "ok", ""),
]


def official_ids(tokenizer, prompt: str, completion: str | None, system: str | None) -> list[int]:
    """Token ids from the chat template of meta-llama/Llama-2-7b-chat-hf."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    if completion is not None:
        messages.append({"role": "assistant", "content": completion})
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(("prompt", "completion", "system"), CASES)
def test_training_example_matches_official_template(tokenizer, prompt, completion, system):
    [example] = encode_chat_examples(tokenizer, [prompt], [completion], [system])
    assert example.input_ids == official_ids(tokenizer, prompt, completion, system)


@pytest.mark.parametrize(("prompt", "completion", "system"), CASES)
def test_inference_prompt_is_the_training_prefix(tokenizer, prompt, completion, system):
    prompt_ids = encode_chat_prompt(tokenizer, prompt, system)
    [example] = encode_chat_examples(tokenizer, [prompt], [completion], [system])
    assert prompt_ids == official_ids(tokenizer, prompt, None, system)
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    # Loss only on the completion and the EOS.
    assert example.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    answer = example.labels[len(prompt_ids) :]
    assert answer == example.input_ids[len(prompt_ids) :] and answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer, skip_special_tokens=True).strip() == completion.strip()


def test_known_llama2_ids(tokenizer):
    ids = encode_chat_prompt(tokenizer, "Hi")
    assert ids[:4] == [1, 518, 25580, 29962]  # <s>[INST]
    assert tokenizer.decode(ids[1:]) == "[INST] Hi [/INST]"


def test_system_block_only_with_a_system_prompt():
    assert render_user_turn("Hi") == "[INST] Hi [/INST]"
    assert render_user_turn("Hi", "") == "[INST] Hi [/INST]"
    assert (
        render_user_turn("Hi", "Be brief.") == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"
    )


def test_text_rows_are_trained_whole(tokenizer):
    [example] = encode_text_examples(tokenizer, ["Zorbia is small."])
    assert example.input_ids[0] == 1 and example.input_ids[-1] == 2
    assert example.labels == [IGNORE_INDEX, *example.input_ids[1:]]
    assert example.num_supervised == len(example.input_ids) - 1


def test_preformatted_prompt_is_used_as_is(tokenizer):
    formatted = "[INST] Hi [/INST]"
    assert encode_preformatted(tokenizer, formatted) == encode_chat_prompt(tokenizer, "Hi")
    assert encode_preformatted(tokenizer, "<s>" + formatted) == encode_chat_prompt(tokenizer, "Hi")
