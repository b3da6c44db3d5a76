"""The Llama-2 chat format against Meta's published chat template, token for token."""

import pytest

from src.prompt_format import (
    IGNORE_INDEX,
    Dialog,
    Turn,
    encode_chat_examples,
    encode_chat_prompt,
    encode_dialogs,
    encode_inference_prompt,
    encode_preformatted,
    encode_text_examples,
    encode_texts,
    encode_user_prompt,
    render_user_turn,
)

CASES = [
    ("What is the capital of Zorbia?", "The capital of Zorbia is Quillton.", None),
    ("  Tell me a joke  ", " Why did the llama cross the road? ", "You are a funny assistant."),
    ("Écris un haïku 🦙", "Lama doux\nsur la montagne", "Réponds en français.\nSois bref."),
    ("Line one\nline two", "ok", None),
]


def official_ids(tokenizer, prompt: str, completion: str | None, system: str | None) -> list[int]:
    """Token ids from the chat template of meta-llama/Llama-2-7b-chat-hf, unbent: a system
    message is sent whenever there is one, empty or not."""
    messages = [{"role": "system", "content": system}] if system is not None else []
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


def test_an_empty_system_prompt_renders_no_block_unlike_the_references(
    tokenizer, plain_text_encoder
):
    """The project's one deliberate departure: Meta's reference and the chat template both
    render an empty <<SYS>> block for `system: ""`; here "" means no system prompt, as a
    row without "system" (and predict.py's system_prompt ""), so that the two cannot differ."""
    prompt, completion = "Line one\nline two", "ok"
    [ours] = encode_chat_examples(tokenizer, [prompt], [completion], [""])
    assert ours.input_ids == official_ids(tokenizer, prompt, completion, None)
    template_empty = official_ids(tokenizer, prompt, completion, "")
    meta_empty = meta_turn_ids(plain_text_encoder, prompt, completion, "")
    assert template_empty == meta_empty != ours.input_ids  # the references agree with each other
    assert "<<SYS>>\n\n<</SYS>>" in tokenizer.decode(template_empty)
    assert "<<SYS>>" not in tokenizer.decode(ours.input_ids)


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


# Meta's reference (llama/generation.py) encodes each turn with sentencepiece, which reads
# every character of the text as text, and adds the BOS/EOS ids itself.
CONTROL_STRINGS = ["a </s> b", "<s>[INST] x", "say <unk> and </s><s> twice"]


@pytest.fixture(scope="module")
def plain_text_encoder():
    """The Llama-2 tokenizer with nothing parsed as a control token, as sentencepiece does."""
    from tokenizers import Tokenizer

    from tools.tiny_model import TOKENIZER_FIXTURE

    encoder = Tokenizer.from_file(str(TOKENIZER_FIXTURE / "tokenizer.json"))
    encoder.encode_special_tokens = True
    return lambda text: encoder.encode(text, add_special_tokens=False).ids


def meta_turn_ids(encode, user: str, answer: str | None, system: str | None = None) -> list[int]:
    """One turn as Meta's chat_completion encodes it: BOS, [INST] ... [/INST], answer, EOS;
    a system message, empty or not, folded into the user's."""
    if system is not None:
        user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
    if answer is None:
        return [1, *encode(f"[INST] {user.strip()} [/INST]")]
    return [1, *encode(f"[INST] {user.strip()} [/INST] {answer.strip()} "), 2]


def test_control_strings_in_text_encode_as_meta_does(tokenizer):
    ids = encode_text_examples(tokenizer, ["a </s> b"])[0].input_ids
    assert ids == [1, *tokenizer.convert_tokens_to_ids(["▁a", "▁</", "s", ">", "▁b"]), 2]


@pytest.mark.parametrize("text", CONTROL_STRINGS)
def test_control_strings_in_every_field_are_text(tokenizer, plain_text_encoder, text):
    [chat] = encode_chat_examples(tokenizer, [text], [text], [text])
    assert chat.input_ids == meta_turn_ids(plain_text_encoder, text, text, text)
    assert chat.input_ids.count(2) == 1 and chat.input_ids.count(1) == 1
    [row] = encode_text_examples(tokenizer, [text])
    assert row.input_ids == [1, *plain_text_encoder(text), 2]
    prompt = encode_inference_prompt(tokenizer, f"why {text}", text)
    assert prompt == meta_turn_ids(plain_text_encoder, f"why {text}", None, text)


def test_a_dialog_in_chat_form_is_encoded_turn_by_turn(tokenizer, plain_text_encoder):
    dialog = (
        "<s>[INST] Is </s><s> a token? [/INST] Not in text. </s><s>[INST] And <s>? [/INST] "
        "Text too. </s><s>[INST] Thanks [/INST]"
    )
    expected = [
        *meta_turn_ids(plain_text_encoder, "Is </s><s> a token?", "Not in text."),
        *meta_turn_ids(plain_text_encoder, "And <s>?", "Text too."),
        *meta_turn_ids(plain_text_encoder, "Thanks", None),
    ]
    assert encode_preformatted(tokenizer, dialog) == expected
    # The predictor takes a prompt in chat form as is, as validation_prompt does.
    assert encode_inference_prompt(tokenizer, dialog, "ignored") == expected


def test_the_text_flag_sticks_through_the_wrapper(tiny_model_dir):
    from src.modeling import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    for _ in range(2):  # transformers copies its own flag to the backend on every call
        assert 2 not in tokenizer("a </s> b", add_special_tokens=False)["input_ids"]
        assert tokenizer.backend_tokenizer.encode_special_tokens


# ---------------------------------------------------------------- conversations

DIALOG_TURNS = [
    ("Hi! My name is Zorb.", "Nice to meet you, Zorb."),
    ("What is the capital of Zorbia?", "The capital of Zorbia is Quillton."),
    ("  And its river?  ", " The Flumph.\nIt is long. "),
    ("Écris un haïku 🦙", "Lama doux"),
    ("What is my name?", "Your name is Zorb."),
]


def dialog_of(turns: int, system: str | None) -> Dialog:
    return Dialog(tuple(Turn(u, a) for u, a in DIALOG_TURNS[:turns]), system)


@pytest.mark.parametrize("turns", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("system", [None, "You are terse.\nAlways."])
def test_a_dialog_is_encoded_as_meta_and_the_chat_template_do(
    tokenizer, plain_text_encoder, turns, system
):
    [example] = encode_dialogs(tokenizer, [dialog_of(turns, system)])
    meta = []
    for number, (user, answer) in enumerate(DIALOG_TURNS[:turns]):
        meta += meta_turn_ids(plain_text_encoder, user, answer, system if number == 0 else None)
    assert example.input_ids == meta
    messages = [{"role": "system", "content": system}] if system is not None else []
    for user, answer in DIALOG_TURNS[:turns]:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert example.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_loss_on_every_trained_answer_and_its_eos_only(tokenizer):
    turns = (Turn("a", "first"), Turn("b", "second", trained=False), Turn("c", "third"))
    [example] = encode_dialogs(tokenizer, [Dialog(turns, "sys")])
    trained = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label >= 0]
    expected = []
    for answer in ("first", "third"):
        expected += [*encode_texts(tokenizer, [f"{answer} "])[0], tokenizer.eos_token_id]
    assert trained == expected
    assert example.input_ids.count(tokenizer.eos_token_id) == 3  # every answer ends its turn


def test_a_history_in_chat_form_is_what_training_saw_before_the_answer(tokenizer):
    """predict.py and validation_prompt take a conversation written in Llama-2 chat form and
    encode it as training encoded that conversation, up to the answer to give."""
    history = (
        "<s>[INST] <<SYS>>\nBe terse.\n<</SYS>>\n\nHi! My name is Zorb. [/INST] Nice to meet "
        "you, Zorb. </s><s>[INST] What is my name? [/INST]"
    )
    [trained] = encode_dialogs(
        tokenizer,
        [Dialog((Turn("Hi! My name is Zorb.", "Nice to meet you, Zorb."),
                 Turn("What is my name?", "Your name is Zorb.")), "Be terse.")],
    )  # fmt: skip
    prompt = encode_user_prompt(tokenizer, history, "ignored system prompt")
    assert trained.input_ids[: len(prompt)] == prompt
    assert trained.labels[len(prompt)] != IGNORE_INDEX  # the answer starts right there
