"""Rows, packing, data order and exact batch semantics."""

import random

import numpy as np
import pytest

from src.prompt_format import IGNORE_INDEX, TokenizedExample
from src.training.batching import (
    Rows,
    build_rows,
    collate,
    epoch_order,
    forward_groups,
    optimizer_steps,
    steps_per_epoch,
)
from src.training.examples import Examples


def make_examples(lengths: list[int], untrained: int = 0) -> Examples:
    """Text-like examples; every third one leaves `untrained` tokens after BOS unlabelled."""
    examples = []
    for n, length in enumerate(lengths):
        ids = [1, *[(n * 7 + i) % 300 + 3 for i in range(length - 1)]]
        labels = [IGNORE_INDEX, *ids[1:]]
        if n % 3 == 0:
            labels[1 : 1 + untrained] = [IGNORE_INDEX] * len(labels[1 : 1 + untrained])
        examples.append(TokenizedExample(ids, labels))
    return Examples.from_tokenized(examples)


def segment_tokens(rows: Rows, row: int) -> list[list[int]]:
    examples = rows.examples
    return [
        examples.input_ids[rows.begins[s] : rows.ends[s]].tolist()
        for s in rows.segments(np.array([row]))
    ]


def collate_rows(rows: Rows, ids: list[int]):
    return collate(rows, rows.segments(np.array(ids, np.int64)))


def test_unpacked_rows_are_the_examples():
    rows, stats = build_rows(make_examples([5, 9, 3]), pack=False, wrap=False, chunk_size=4)
    assert rows.lengths.tolist() == [5, 9, 3] and stats.efficiency == 1.0


def test_best_fit_packing_drops_nothing_and_respects_chunk_size():
    lengths = [random.Random(i).randint(2, 60) for i in range(200)]
    examples = make_examples(lengths)
    rows, stats = build_rows(examples, pack=True, wrap=False, chunk_size=64)
    assert rows.lengths.max() <= 64
    packed = sorted(t for r in range(len(rows)) for s in segment_tokens(rows, r) for t in s)
    assert packed == sorted(examples.input_ids.tolist())
    assert stats.real_tokens == sum(lengths)
    assert stats.efficiency > 0.95  # best-fit decreasing on small items fills rows nearly full


def test_packing_never_cuts_an_example():
    with pytest.raises(ValueError, match="70 tokens does not fit chunk_size 64"):
        build_rows(make_examples([10, 70]), pack=True, wrap=False, chunk_size=64)


def test_best_fit_puts_each_example_where_it_fits_tightest():
    """Capacity 10, lengths 8, 6, 3, 1: first-fit decreasing puts the 1 into the first row
    with room ([8, 1], [6, 3]); best-fit puts it where the least room is left ([8], [6, 3, 1])."""
    rows, _ = build_rows(make_examples([3, 8, 1, 6]), pack=True, wrap=False, chunk_size=10)
    packed = sorted(sorted(map(len, segment_tokens(rows, r))) for r in range(len(rows)))
    assert packed == [[1, 3, 6], [8]]


def test_best_fit_takes_the_first_made_of_equally_full_rows():
    """Lengths 6, 6, 2 in rows of 8: the 2 joins the first row (both have 2 left)."""
    rows, _ = build_rows(make_examples([6, 6, 2]), pack=True, wrap=False, chunk_size=8)
    assert rows.begins.tolist() == [0, 12, 6]  # examples 1 and 3, then example 2
    assert rows.offsets.tolist() == [0, 2, 3]


def test_wrap_cuts_rows_of_exactly_chunk_size():
    examples = make_examples([30, 50, 25])
    rows, _ = build_rows(examples, pack=True, wrap=True, chunk_size=32)
    assert rows.lengths.tolist() == [32, 32, 32, 9]
    wrapped = [t for r in range(len(rows)) for s in segment_tokens(rows, r) for t in s]
    assert wrapped == examples.input_ids.tolist()


@pytest.mark.parametrize(("pack", "wrap"), [(False, False), (True, False), (True, True)])
def test_tokens_in_are_tokens_trained(pack, wrap):
    examples = make_examples([random.Random(i).randint(2, 60) for i in range(40)], untrained=3)
    rows, stats = build_rows(examples, pack=pack, wrap=wrap, chunk_size=64)
    batch = collate_rows(rows, list(range(len(rows))))
    real = int(examples.lengths.sum())
    supervised = int(examples.supervised.sum())
    assert supervised < real - len(examples)  # the unlabelled prompt tokens count for nothing
    assert batch.num_real_tokens == stats.real_tokens == real
    assert batch.num_targets == supervised == rows.num_targets.sum()


def test_collate_lays_rows_end_to_end_with_restarting_positions():
    rows, _ = build_rows(make_examples([3, 4, 2]), pack=False, wrap=False, chunk_size=8)
    batch = collate_rows(rows, [0, 1, 2])
    assert batch.input_ids.shape == (1, 9)  # no padding
    assert batch.position_ids[0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1]
    # The last token of each segment predicts nothing (no target across a boundary).
    first = segment_tokens(rows, 0)[0]
    assert batch.targets[0, :3].tolist() == [*first[1:], IGNORE_INDEX]
    assert batch.num_targets == 2 + 3 + 1 == rows.num_targets.sum()
    assert batch.segment_lengths == (3, 4, 2) and batch.num_real_tokens == 9
    supervised = (batch.targets[0] != IGNORE_INDEX).nonzero().flatten()
    assert batch.supervised_positions.tolist() == supervised.tolist()
    assert batch.supervised_targets.tolist() == batch.targets[0, supervised].tolist()


def test_wrapped_fragments_carry_the_next_label():
    rows, _ = build_rows(make_examples([6]), pack=True, wrap=True, chunk_size=4)
    first, second = collate_rows(rows, [0]), collate_rows(rows, [1])
    ids = segment_tokens(rows, 0)[0] + segment_tokens(rows, 1)[0]
    assert first.targets[0].tolist() == ids[1:5]  # the 4th position predicts the 5th token
    assert second.targets[0].tolist() == [ids[5], IGNORE_INDEX]
    assert rows.num_targets.tolist() == [4, 1]


def test_forward_groups_split_at_segment_boundaries():
    rows, _ = build_rows(make_examples([3, 4, 2, 5]), pack=True, wrap=False, chunk_size=8)
    every = rows.segments(np.arange(len(rows)))
    groups = forward_groups(rows, np.arange(len(rows)), max_tokens=6)
    assert np.concatenate(groups).tolist() == every.tolist()
    sizes = [int(rows.segment_lengths[g].sum()) for g in groups]
    assert all(s <= 6 for s in sizes) and sum(sizes) == 14
    assert [g.tolist() for g in forward_groups(rows, np.arange(len(rows)), None)] == [
        every.tolist()
    ]


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
    seen = sorted(r for s in steps for m in s.micro_batches for r in m.tolist())
    assert seen == list(range(23))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_share_each_step_exactly(world_size):
    rows, _ = build_rows(
        make_examples([random.Random(i).randint(2, 20) for i in range(21)]), False, False, 64
    )
    order = epoch_order(21, 1, 0)
    single = list(optimizer_steps(rows, order, 8, 2))
    shares = [list(optimizer_steps(rows, order, 8, 2, r, world_size)) for r in range(world_size)]
    for step, *rank_steps in zip(single, *shares, strict=True):
        together = sorted(r for s in rank_steps for m in s.micro_batches for r in m.tolist())
        assert together == sorted(r for m in step.micro_batches for r in m.tolist())
        assert all(s.num_targets == step.num_targets for s in rank_steps)
        assert all(len(m) <= 2 for s in rank_steps for m in s.micro_batches)
