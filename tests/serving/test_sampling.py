"""Sampling on the device: each row's distribution is transformers' for its own settings (the
batched sort and the per-row shortcuts drop exactly the same tokens), EOS is impossible
before min_new_tokens, a seed's random numbers are the same whatever else is sampled, and a
token of probability 0 is never drawn."""

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from src.serving.sampling import (
    CandidateTopPWarper,
    SamplingRows,
    SamplingSettings,
    draw,
    filter_sorted,
    sample_rows,
    sampling_seed,
    uniforms,
)

EOS = 2
VOCAB = 32000
SETTINGS = [
    SamplingSettings(max_new_tokens=8),  # predict.py's defaults
    SamplingSettings(max_new_tokens=8, temperature=1.0, top_p=1.0, repetition_penalty=1.0),
    SamplingSettings(max_new_tokens=8, temperature=0.5, top_k=5, top_p=1.0),
    SamplingSettings(max_new_tokens=8, temperature=2.0, top_k=40, top_p=0.6),
    SamplingSettings(max_new_tokens=8, temperature=0.01, top_p=0.999, repetition_penalty=2.0),
    SamplingSettings(max_new_tokens=8, top_p=0.0, min_new_tokens=3),
]


def rows_for(settings: list[SamplingSettings], prompts: list[list[int]]) -> SamplingRows:
    rows = SamplingRows.empty(len(settings), VOCAB, torch.device("cpu"))
    for row, (each, prompt) in enumerate(zip(settings, prompts, strict=True)):
        rows.set_row(row, each, sampling_seed(each) if each.seed else 1000 + row, prompt)
    return rows


def transformers_scores(logits, seen_ids, settings: SamplingSettings) -> torch.Tensor:
    """transformers' processors for one row, in generate's order."""
    processors = LogitsProcessorList()
    if settings.repetition_penalty not in (0.0, 1.0):
        processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    processors.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k > 0:
        processors.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1.0:
        processors.append(TopPLogitsWarper(settings.top_p))
    return processors(torch.tensor([seen_ids]), logits[None].clone())[0]


def random_logits(rows: int, spread: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=generator) * spread


@pytest.mark.parametrize("spread", [0.5, 3.0, 8.0])  # flat to peaked
@pytest.mark.parametrize("shortcuts", [True, False], ids=["per-row", "batched"])
def test_each_row_keeps_what_transformers_keeps(spread, shortcuts, monkeypatch):
    """Rows with different settings in one call: each row's kept tokens and their
    probabilities are transformers' for its own settings (the temperature divides by a
    tensor here, a Python float there: the probabilities agree to float rounding)."""
    logits = random_logits(len(SETTINGS), spread, seed=int(spread))
    prompts = [[5, 7, 7, int(logits[row].argmax())] for row in range(len(SETTINGS))]
    rows = rows_for(SETTINGS, prompts)
    seen: list[torch.Tensor] = []

    def keep_distribution(probabilities, uniform):
        seen.append(probabilities)
        return draw(probabilities, uniform)

    monkeypatch.setattr("src.serving.sampling.draw", keep_distribution)
    sample_rows(logits.clone(), rows, EOS, shortcuts=shortcuts)
    (ours,) = seen
    for row, settings in enumerate(SETTINGS):
        theirs = transformers_scores(logits[row], prompts[row], settings)
        if settings.min_new_tokens > 0:
            theirs[EOS] = -torch.inf
        kept = ours[row] > 0
        assert torch.equal(kept, torch.isfinite(theirs).logical_and(theirs.softmax(0) > 0))
        torch.testing.assert_close(ours[row], theirs.softmax(0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("spread", [0.5, 1.5, 3.0, 8.0])
def test_the_per_row_shortcuts_and_the_batched_sort_sample_alike(spread):
    """What a CPU's eager step and a GPU's captured step draw for the same rows: the same."""
    settings = SETTINGS * 2
    logits = random_logits(len(settings), spread, seed=11)
    prompts = [[3, 4, 5]] * len(settings)
    per_row, batched = rows_for(settings, prompts), rows_for(settings, prompts)
    for _ in range(5):
        ours = sample_rows(logits.clone(), per_row, EOS, shortcuts=True)
        theirs = sample_rows(logits.clone(), batched, EOS, shortcuts=False)
        assert torch.equal(ours, theirs)
        logits = logits.roll(1, dims=1)
    assert torch.equal(per_row.seen, batched.seen)
    assert per_row.produced.tolist() == [5] * len(settings)


@pytest.mark.parametrize("top_p", [0.0, 0.5, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("spread", [0.5, 3.0, 8.0])  # flat: the full sort; peaked: candidates
def test_candidate_top_p_is_transformers_top_p(top_p, spread):
    torch.manual_seed(int(spread * 10))
    scores = torch.randn(1, VOCAB) * spread
    ids = torch.tensor([[1, 2, 3]])
    ours = CandidateTopPWarper(top_p)(ids, scores.clone())
    theirs = TopPLogitsWarper(top_p)(ids, scores.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.equal(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])
    batched = filter_sorted(scores.clone(), torch.tensor([VOCAB]), torch.tensor([1 - top_p]))
    assert torch.equal(batched, theirs)


@pytest.mark.parametrize("spread", [0.5, 3.0, 8.0])  # flat: the tail; wider: 4,096; peaked: 256
def test_top_p_of_flat_to_peaked_distributions_sorts_no_whole_vocabulary(spread, monkeypatch):
    """Each shortcut computes transformers' top-p exactly, and none sorts all 32,000."""
    torch.manual_seed(7)
    scores = torch.randn(1, VOCAB) * spread
    theirs = TopPLogitsWarper(0.95)(torch.tensor([[1]]), scores.clone())

    def no_full_sort(*args, **kwargs):
        raise AssertionError("sorted all 32,000 logits")

    monkeypatch.setattr("src.serving.sampling.filter_sorted", no_full_sort)
    ours = CandidateTopPWarper(0.95)(torch.tensor([[1]]), scores.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.equal(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])
    assert 0 < int(torch.isinf(ours).sum()) < VOCAB - 1  # something dropped, something kept


def test_eos_is_impossible_before_min_new_tokens():
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 50.0  # EOS by far the likeliest
    settings = SamplingSettings(max_new_tokens=9, min_new_tokens=3, top_p=1.0)
    rows = rows_for([settings], [[5]])
    drawn = [int(sample_rows(logits.clone(), rows, EOS, shortcuts=True)) for _ in range(5)]
    assert EOS not in drawn[:3] and drawn[3:] == [EOS, EOS]


def test_the_repetition_penalty_counts_what_was_drawn():
    logits = torch.zeros(1, VOCAB)
    logits[0, 100] = logits[0, 101] = 5.0
    settings = SamplingSettings(max_new_tokens=9, temperature=0.01, repetition_penalty=2.0)
    rows = rows_for([settings], [[7]])
    first = int(sample_rows(logits.clone(), rows, EOS, shortcuts=True))
    second = int(sample_rows(logits.clone(), rows, EOS, shortcuts=True))
    assert {first, second} == {100, 101}  # the first one drawn is penalised after


def test_a_seed_draws_the_same_numbers_whatever_runs_beside_it():
    seed = torch.tensor([[12345 >> 32, 12345 & 0xFFFFFFFF], [0, 99]])
    counters = torch.tensor([3, 3])
    alone = uniforms(seed[:1], counters[:1])
    together = uniforms(seed, counters)
    assert torch.equal(together[:1], alone)
    assert together[0] != together[1]  # another seed, another number
    # a million counters of one seed: uniform on [0, 1), no repeats to speak of
    many = uniforms(seed[:1].expand(1_000_000, 2), torch.arange(1_000_000))
    assert float(many.min()) >= 0 and float(many.max()) < 1
    assert abs(float(many.mean()) - 0.5) < 2e-3 and abs(float(many.std()) - 12**-0.5) < 2e-3
    counts = torch.histc(many, bins=100, min=0, max=1)
    assert float(counts.min()) > 9_500 and float(counts.max()) < 10_500
    assert many.unique().numel() > 960_000  # of 2**24 values: a few collisions, no cycle
    assert sampling_seed(SamplingSettings(max_new_tokens=1, seed=7)) == sampling_seed(
        SamplingSettings(max_new_tokens=1, seed=7)
    )
    assert sampling_seed(SamplingSettings(max_new_tokens=1)) != sampling_seed(
        SamplingSettings(max_new_tokens=1)
    )  # unseeded: fresh entropy


def test_draw_follows_the_distribution_and_never_draws_a_zero():
    probabilities = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]]).expand(4000, 6)
    seed = torch.tensor([[0, 1]]).expand(4000, 2)
    tokens = draw(probabilities, uniforms(seed, torch.arange(4000)))
    counts = torch.bincount(tokens, minlength=6).float()
    assert counts[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(counts / 4000, probabilities[0], atol=0.03, rtol=0)


def test_a_seed_s_numbers_are_pinned():
    """The hash's numbers, fixed: a seed gives these on every device and every version (the
    high 32 bits of the seed count as much as the low ones)."""
    seed = 26439743089684537  # high bits set
    rows = torch.tensor([[seed >> 32, seed & 0xFFFFFFFF]]).expand(4, 2)
    expected = [0.11997050046920776, 0.6876344680786133, 0.08808863162994385, 0.5227187275886536]
    assert uniforms(rows, torch.arange(4)).tolist() == expected
    other_high = torch.tensor([[(seed >> 32) ^ 1, seed & 0xFFFFFFFF]])
    assert uniforms(other_high, torch.tensor([0])).item() != expected[0]
    assert uniforms(torch.tensor([[0, 0]]), torch.tensor([0])).item() != 0  # no fixed point


def test_a_draw_on_a_boundary_never_takes_a_token_of_probability_zero():
    probabilities = torch.tensor([[0.5, 0.0, 0.5]])
    assert draw(probabilities, torch.tensor([0.5])).tolist() == [2]  # not 1, whose p is 0
    assert draw(probabilities, torch.tensor([0.0])).tolist() == [0]


def test_a_row_taken_anew_forgets_its_last_stream_and_rows_move_whole():
    rows = rows_for(SETTINGS[:2], [[5, 6], [7]])
    rows.produced[0] = 3
    rows.set_row(0, SETTINGS[2], 99, [8])
    assert rows.seen[0].nonzero().flatten().tolist() == [8] and rows.produced[0] == 0
    before = {name: getattr(rows, name)[1].clone() for name in vars(rows)}
    rows.move_row(1, 0)
    for name, value in before.items():
        assert torch.equal(getattr(rows, name)[0], value), name
