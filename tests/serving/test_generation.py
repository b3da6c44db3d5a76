"""Streaming text: whole characters only, stop sequences cut and never emitted."""

import pytest
import torch

from src.serving.generation import (
    SamplingSettings,
    TextStream,
    logits_processors,
    sampling_distribution,
)


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


def test_processors_follow_the_off_switches():
    off = SamplingSettings(max_new_tokens=1, top_p=1.0, top_k=-1, repetition_penalty=1.0)
    assert [type(p).__name__ for p in logits_processors(off)] == ["TemperatureLogitsWarper"]
    on = SamplingSettings(max_new_tokens=1, top_p=0.9, top_k=5, repetition_penalty=1.2)
    assert len(logits_processors(on)) == 4


def reference_distribution(logits, seen, temperature, top_k, top_p, penalty):
    """Sampling as the settings define it, written out: the repetition penalty divides a
    seen token's positive logit (multiplies a negative one), temperature divides the logits,
    top-k keeps the k largest, top-p the fewest most likely tokens whose mass reaches p."""
    logits = logits.clone().double()
    for token in set(seen):
        logits[token] = logits[token] / penalty if logits[token] > 0 else logits[token] * penalty
    logits = logits / temperature
    order = logits.argsort(descending=True)
    keep = torch.zeros_like(logits, dtype=torch.bool)
    keep[order[: top_k if top_k > 0 else len(logits)]] = True
    probabilities = torch.where(keep, logits, -torch.inf).softmax(0)
    if top_p < 1.0:
        sorted_probabilities = probabilities[order]
        mass_before = sorted_probabilities.cumsum(0) - sorted_probabilities
        keep[order[mass_before >= top_p]] = False
    return torch.where(keep, logits, -torch.inf).softmax(0)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "penalty"),
    [(1.0, -1, 1.0, 1.0), (0.5, -1, 1.0, 1.0), (2.0, 5, 1.0, 1.0), (0.7, -1, 0.6, 1.0),
     (0.7, 8, 0.9, 1.15), (0.01, -1, 1.0, 1.0)],
)  # fmt: skip
def test_the_sampling_distribution_follows_the_settings(temperature, top_k, top_p, penalty):

    torch.manual_seed(0)
    logits = torch.randn(50) * 3
    seen = [3, 7, 7, 20, int(logits.argmax())]
    settings = SamplingSettings(
        max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=penalty,
    )  # fmt: skip
    ours = sampling_distribution(
        logits[None].clone(), torch.tensor([seen]), logits_processors(settings), False, 2
    )[0].double()
    expected = reference_distribution(logits, seen, temperature, top_k, top_p, penalty)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    if top_k > 0:
        assert int((ours > 0).sum()) <= top_k


def test_eos_is_impossible_before_min_new_tokens():

    logits = torch.zeros(1, 10)
    logits[0, 2] = 50.0  # EOS by far the likeliest
    off = SamplingSettings(max_new_tokens=1, top_p=1.0, repetition_penalty=1.0)
    probabilities = sampling_distribution(
        logits, torch.tensor([[5]]), logits_processors(off), True, 2
    )
    assert probabilities[0, 2] == 0 and probabilities.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("top_p", [0.0, 0.5, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("spread", [0.5, 3.0, 8.0])  # flat: the full sort; peaked: candidates
def test_candidate_top_p_is_transformers_top_p(top_p, spread):
    from transformers import TopPLogitsWarper

    from src.serving.generation import CandidateTopPWarper

    torch.manual_seed(int(spread * 10))
    scores = torch.randn(1, 32000) * spread
    ids = torch.tensor([[1, 2, 3]])
    ours = CandidateTopPWarper(top_p)(ids, scores.clone())
    theirs = TopPLogitsWarper(top_p)(ids, scores.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.equal(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])


def test_a_peaked_distribution_never_sorts_the_whole_vocabulary(monkeypatch):
    from transformers import TopPLogitsWarper

    from src.serving.generation import CandidateTopPWarper

    def no_full_sort(*args, **kwargs):
        raise AssertionError("sorted all 32,000 logits")

    scores = torch.randn(1, 32000) * 8  # a trained model's next token: a few tokens hold p
    warper = CandidateTopPWarper(0.95)
    monkeypatch.setattr(TopPLogitsWarper, "__call__", no_full_sort)
    assert torch.isfinite(warper(torch.tensor([[1]]), scores)).sum() < 256


@pytest.mark.parametrize("spread", [0.5, 3.0, 8.0])  # flat: the tail; wider: 4,096; peaked: 256
def test_top_p_of_flat_to_peaked_distributions_sorts_no_whole_vocabulary(spread, monkeypatch):
    """Each shortcut computes transformers' top-p exactly, and none sorts all 32,000."""
    from transformers import TopPLogitsWarper

    from src.serving.generation import CandidateTopPWarper

    torch.manual_seed(7)
    scores = torch.randn(1, 32000) * spread
    theirs = TopPLogitsWarper(0.95)(torch.tensor([[1]]), scores.clone())

    def no_full_sort(*args, **kwargs):
        raise AssertionError("sorted all 32,000 logits")

    monkeypatch.setattr(TopPLogitsWarper, "__call__", no_full_sort)
    ours = CandidateTopPWarper(0.95)(torch.tensor([[1]]), scores.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.equal(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])
    assert 0 < int(torch.isinf(ours).sum()) < 32000 - 1  # something dropped, something kept


def test_draw_follows_the_distribution_and_never_draws_a_zero():
    from src.serving.generation import draw

    generator = torch.Generator().manual_seed(0)
    probabilities = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]])
    counts = torch.zeros(6)
    for _ in range(4000):
        counts[int(draw(probabilities, generator))] += 1
    assert counts[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(counts / 4000, probabilities[0], atol=0.03, rtol=0)
    again = torch.Generator().manual_seed(0)
    first = [int(draw(probabilities, again)) for _ in range(20)]
    assert first == [int(draw(probabilities, g)) for g in [torch.Generator().manual_seed(0)]
                     for _ in range(20)]  # fmt: skip
