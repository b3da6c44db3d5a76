"""Streaming text: whole characters only, stop sequences cut and never emitted."""

import pytest

from src.serving.generation import TextStream


def stream(tokenizer, text: str, stops: list[str]) -> list[str]:
    """Feed the tokens of `text` one by one, as generation would."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = TextStream(tokenizer, stops)
    pieces = []
    for token_id in ids:
        pieces.append(out.push(token_id))
        if out.stopped:
            break
    pieces.append(out.flush())
    return [p for p in pieces if p]


def test_pieces_join_to_the_decoded_text(tokenizer):
    text = "Hello world, this is a llama speaking."
    assert "".join(stream(tokenizer, text, [])) == text


TEXTS = [
    "Hello world, this is a llama speaking.",
    "日本語のテキストと、 emoji 🎉🎊 mixed in.",
    "  spaces   and\nnewlines\n\n  indented",
    "The capital of Zorbia is Quillton. </s> [INST] not a tag",
    "Perú, 镇 Ꙋ, Ελληνικά, עברית, 🦙🦙",
]


@pytest.mark.parametrize("seed", range(12))
def test_each_token_s_text_from_a_window_is_the_whole_decoding_s(tokenizer, seed):
    """After every token the text so far equals the whole answer decoded (where that ends
    in a whole character), for real text and for random tokens (byte tokens among them);
    and no decoded window grows with the answer."""
    import random

    from src.serving.generation import REPLACEMENT_CHAR

    rng = random.Random(seed)
    text = " ".join(rng.sample(TEXTS, 3))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids += [rng.randrange(3, tokenizer.vocab_size) for _ in range(40)] + ids[:30]
    windows = []
    real_decode = tokenizer.decode

    def decode(token_ids, **kwargs):
        windows.append(len(token_ids))
        return real_decode(token_ids, **kwargs)

    out = TextStream(tokenizer, [])
    pieces = []
    for index, token_id in enumerate(ids):
        tokenizer.decode = decode
        try:
            pieces.append(out.push(token_id))
        finally:
            del tokenizer.decode
        whole = tokenizer.decode(ids[: index + 1], skip_special_tokens=True)
        if not whole.endswith(REPLACEMENT_CHAR):
            assert out.text == whole, index
    pieces.append(out.flush())
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True).rstrip()
    assert max(windows) <= 8 and len(ids) > 60


def test_multibyte_characters_are_never_split(tokenizer):
    text = "Llamas 🦙 live in Perú, 镇 Ꙋ."
    pieces = stream(tokenizer, text, [])
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len(tokenizer(["🦙"], add_special_tokens=False)["input_ids"][0]) > 2  # byte tokens


@pytest.mark.parametrize(
    ("stops", "expected"),
    [
        (["<end>"], "The answer is 42. "),  # "<end>" spans several tokens
        (["42"], "The answer is "),
        (["nothing", "is 4"], "The answer "),  # the earliest stop wins
        (["xyz"], "The answer is 42. <end> and more"),
    ],
)
def test_stop_sequences_cut_the_text(tokenizer, stops, expected):
    pieces = stream(tokenizer, "The answer is 42. <end> and more", stops)
    assert "".join(pieces) == expected


def test_text_that_may_start_a_stop_sequence_is_held_back(tokenizer):
    out = TextStream(tokenizer, ["<end>"])
    ids = tokenizer("ok <end>", add_special_tokens=False)["input_ids"]
    emitted = [out.push(t) for t in ids]
    assert "".join(emitted) == "ok " and out.stopped
    assert emitted[-1] == ""  # "<en..." was held back, then cut
    assert out.flush() == ""


def test_trailing_whitespace_of_the_format_is_dropped(tokenizer):
    assert "".join(stream(tokenizer, "Quillton. ", [])) == "Quillton."
