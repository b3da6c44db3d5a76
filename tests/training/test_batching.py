"""Rows, packing, data order and exact batch semantics."""

import random

import pytest

from src.prompt_format import IGNORE_INDEX, TokenizedExample
from src.training.batching import build_rows, collate, epoch_order, optimizer_steps, steps_per_epoch
from src.training.data import Example


def make_examples(lengths: list[int]) -> list[Example]:
    examples = []
    for n, length in enumerate(lengths):
        ids = [1, *[(n * 7 + i) % 300 + 3 for i in range(length - 1)]]
        examples.append(Example(f"line {n + 1}", TokenizedExample(ids, [IGNORE_INDEX, *ids[1:]])))
    return examples


def flat_tokens(rows) -> list[int]:
    return sorted(t for row in rows for s in row.segments for t in s.input_ids)


def test_unpacked_rows_are_the_examples():
    examples = make_examples([5, 9, 3])
    rows, stats = build_rows(examples, pack=False, wrap=False, chunk_size=4)
    assert [len(r) for r in rows] == [5, 9, 3] and stats.efficiency == 1.0


def test_best_fit_packing_drops_nothing_and_respects_chunk_size():
    lengths = [random.Random(i).randint(2, 60) for i in range(200)]
    examples = make_examples(lengths)
    rows, stats = build_rows(examples, pack=True, wrap=False, chunk_size=64)
    assert all(len(r) <= 64 for r in rows)
    assert flat_tokens(rows) == sorted(t for e in examples for t in e.tokens.input_ids)
    assert stats.real_tokens == sum(lengths)
    assert stats.efficiency > 0.95  # best-fit decreasing on small items fills rows nearly full


def test_packing_never_cuts_an_example():
    with pytest.raises(ValueError, match="70 tokens does not fit chunk_size 64"):
        build_rows(make_examples([10, 70]), pack=True, wrap=False, chunk_size=64)


def test_best_fit_puts_each_example_where_it_fits_tightest():
    """Capacity 10, lengths 8, 6, 3, 1: first-fit decreasing puts the 1 into the first row
    with room ([8, 1], [6, 3]); best-fit puts it where the least room is left ([8], [6, 3, 1])."""
    rows, _ = build_rows(make_examples([3, 8, 1, 6]), pack=True, wrap=False, chunk_size=10)
    packed = sorted(sorted(len(s.input_ids) for s in row.segments) for row in rows)
    assert packed == [[1, 3, 6], [8]]


def test_wrap_cuts_rows_of_exactly_chunk_size():
    examples = make_examples([30, 50, 25])
    rows, _ = build_rows(examples, pack=True, wrap=True, chunk_size=32)
    assert [len(r) for r in rows] == [32, 32, 32, 9]
    stream = [t for e in examples for t in e.tokens.input_ids]
    assert [t for r in rows for s in r.segments for t in s.input_ids] == stream


@pytest.mark.parametrize(("pack", "wrap"), [(False, False), (True, False), (True, True)])
def test_tokens_in_are_tokens_trained(pack, wrap):
    examples = make_examples([random.Random(i).randint(2, 60) for i in range(40)])
    for example in examples[::3]:  # a prompt part without loss, as in chat rows
        example.tokens.labels[1:4] = [IGNORE_INDEX] * 3
    rows, stats = build_rows(examples, pack=pack, wrap=wrap, chunk_size=64)
    batch = collate(rows)
    real = sum(len(e) for e in examples)
    supervised = sum(e.tokens.num_supervised for e in examples)
    assert batch.num_real_tokens == stats.real_tokens == real
    assert batch.num_targets == supervised


def test_collate_lays_rows_end_to_end_with_restarting_positions():
    rows, _ = build_rows(make_examples([3, 4]), pack=True, wrap=False, chunk_size=8)
    single, _ = build_rows(make_examples([2]), pack=False, wrap=False, chunk_size=8)
    batch = collate([*rows, *single])
    assert batch.input_ids.shape == (1, 9)  # no padding
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1]
    # The last token of each segment predicts nothing (no target across a boundary).
    first = rows[0].segments[0].input_ids
    assert batch.targets[0, : len(first)].tolist() == [*first[1:], IGNORE_INDEX]
    assert batch.num_targets == 3 + 2 + 1 == sum(r.num_targets for r in [*rows, *single])
    assert batch.num_real_tokens == 9


def test_wrapped_fragments_carry_the_next_label():
    rows, _ = build_rows(make_examples([6]), pack=True, wrap=True, chunk_size=4)
    first, second = collate(rows[:1]), collate(rows[1:])
    ids = rows[0].segments[0].input_ids + rows[1].segments[0].input_ids
    assert first.targets[0].tolist() == ids[1:5]  # the 4th position predicts the 5th token
    assert second.targets[0].tolist() == [ids[5], IGNORE_INDEX]


def test_epoch_order_depends_on_seed_and_epoch_only():
    assert epoch_order(50, seed=42, epoch=0) == epoch_order(50, seed=42, epoch=0)
    assert epoch_order(50, seed=42, epoch=0) != epoch_order(50, seed=42, epoch=1)
    assert epoch_order(50, seed=42, epoch=0) != epoch_order(50, seed=7, epoch=0)
    assert sorted(epoch_order(50, seed=42, epoch=3)) == list(range(50))


@pytest.mark.parametrize(("batch", "micro"), [(4, 4), (4, 1), (8, 3), (5, 2)])
def test_each_step_sees_exactly_the_global_batch(batch, micro):
    rows, _ = build_rows(
        make_examples([random.Random(i).randint(2, 20) for i in range(23)]), False, False, 64
    )
    steps = list(optimizer_steps(rows, epoch_order(23, 1, 0), batch, micro))
    assert len(steps) == steps_per_epoch(23, batch)
    sizes = [sum(len(m) for m in s.micro_batches) for s in steps]
    assert sizes[:-1] == [batch] * (len(steps) - 1)
    assert sum(sizes) == 23  # the last step takes the rest
    assert all(len(m) <= micro for s in steps for m in s.micro_batches)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_share_each_step_exactly(world_size):
    rows, _ = build_rows(
        make_examples([random.Random(i).randint(2, 20) for i in range(21)]), False, False, 64
    )
    order = epoch_order(21, 1, 0)
    single = list(optimizer_steps(rows, order, 8, 2))
    shares = [list(optimizer_steps(rows, order, 8, 2, r, world_size)) for r in range(world_size)]
    for step, *rank_steps in zip(single, *shares, strict=True):
        together = sorted(id(r) for s in rank_steps for m in s.micro_batches for r in m)
        assert together == sorted(id(r) for m in step.micro_batches for r in m)
        assert all(s.num_targets == step.num_targets for s in rank_steps)
        assert all(len(m) <= 2 for s in rank_steps for m in s.micro_batches)
