"""Streaming text: whole characters only, stop sequences cut and never emitted."""

import pytest

from src.generation import SamplingSettings, TextStream, logits_processors


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


def test_processors_follow_the_off_switches():
    off = SamplingSettings(max_new_tokens=1, top_p=1.0, top_k=-1, repetition_penalty=1.0)
    assert [type(p).__name__ for p in logits_processors(off)] == ["TemperatureLogitsWarper"]
    on = SamplingSettings(max_new_tokens=1, top_p=0.9, top_k=5, repetition_penalty=1.2)
    assert len(logits_processors(on)) == 4
