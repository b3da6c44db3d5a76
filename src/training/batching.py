"""From tokenized examples to micro-batches: packing, the data order and exact batch semantics.

A *row* is one line of a batch: a sequence of *segments* (whole examples, or fragments of
examples in wrap mode). Without packing a row is one example. Every segment starts its own
position ids at 0 and the attention keeps segments apart by them (no token attends across a
segment boundary), so a micro-batch is its rows laid end to end, with no padding at all.

An optimizer step takes exactly `train_batch_size` rows (the last step of an epoch takes what
is left), split into micro-batches of at most `micro_batch_size` rows.
"""

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from src.prompt_format import IGNORE_INDEX, TokenizedExample
from src.seeds import derive_seed
from src.training.data import Example


@dataclass(frozen=True)
class Segment:
    """Tokens that attend to each other: an example, or a fragment of one in wrap mode."""

    input_ids: list[int]
    labels: list[int]
    next_label: int = IGNORE_INDEX  # the label of the token after a fragment, in the next row

    @classmethod
    def of(cls, example: TokenizedExample) -> "Segment":
        return cls(example.input_ids, example.labels)


@dataclass(frozen=True)
class Row:
    segments: tuple[Segment, ...]

    def __len__(self) -> int:
        return sum(len(s.input_ids) for s in self.segments)

    @property
    def num_targets(self) -> int:
        """Supervised positions: every label but a segment's first, plus carried ones."""
        return sum(
            sum(label != IGNORE_INDEX for label in s.labels[1:]) + (s.next_label != IGNORE_INDEX)
            for s in self.segments
        )


@dataclass(frozen=True)
class PackingStats:
    rows: int
    real_tokens: int
    slots: int  # rows x chunk_size when packing, real tokens otherwise

    @property
    def efficiency(self) -> float:
        return self.real_tokens / self.slots if self.slots else 1.0


@dataclass(frozen=True)
class MicroBatch:
    input_ids: torch.Tensor  # (1, N): the micro-batch's rows end to end
    position_ids: torch.Tensor  # (1, N), restarting at 0 at each segment
    targets: torch.Tensor  # (1, N), the token to predict at each position, or IGNORE_INDEX
    num_targets: int
    num_real_tokens: int
    segment_lengths: tuple[int, ...]  # for the attention (src/attention.PackedSegments)


def build_rows(
    examples: list[Example], pack: bool, wrap: bool, chunk_size: int
) -> tuple[list[Row], PackingStats]:
    """Rows for training: one per example, packed best-fit-decreasing, or wrapped.

    Packing without wrap takes examples of at most `chunk_size` tokens (longer ones are a
    user error, raised with their lines by src.training.data.check_lengths before this runs).
    """
    segments = [Segment.of(e.tokens) for e in examples]
    real = sum(len(s.input_ids) for s in segments)
    if not pack:
        return [Row((s,)) for s in segments], PackingStats(len(segments), real, real)
    if wrap:
        rows = _wrap(segments, chunk_size)
        return rows, PackingStats(len(rows), real, len(rows) * chunk_size)
    longest = max((len(s.input_ids) for s in segments), default=0)
    if longest > chunk_size:
        raise ValueError(f"an example of {longest} tokens does not fit chunk_size {chunk_size}")
    rows = _best_fit_decreasing(segments, chunk_size)
    return rows, PackingStats(len(rows), real, len(rows) * chunk_size)


def _best_fit_decreasing(segments: list[Segment], capacity: int) -> list[Row]:
    """Longest first, each into the fullest row that still has room: nothing is dropped."""
    bins: list[list[Segment]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, bin index)
    for segment in sorted(segments, key=lambda s: len(s.input_ids), reverse=True):
        size = len(segment.input_ids)
        at = bisect.bisect_left(free, (size, -1))
        if at == len(free):
            bins.append([segment])
            bisect.insort(free, (capacity - size, len(bins) - 1))
            continue
        room, index = free.pop(at)
        bins[index].append(segment)
        bisect.insort(free, (room - size, index))
    return [Row(tuple(b)) for b in bins]


def _wrap(segments: list[Segment], chunk_size: int) -> list[Row]:
    """Cut the stream of all examples into rows of exactly chunk_size tokens (but the last).

    A fragment that continues in the next row carries the label of the token that follows
    it, so its last position is still trained: every label of every example is trained once.
    """
    rows: list[Row] = []
    current: list[Segment] = []
    room = chunk_size
    for segment in segments:
        ids, labels = segment.input_ids, segment.labels
        while ids:
            take = min(room, len(ids))
            next_label = labels[take] if take < len(ids) else IGNORE_INDEX
            current.append(Segment(ids[:take], labels[:take], next_label))
            ids, labels, room = ids[take:], labels[take:], room - take
            if room == 0:
                rows.append(Row(tuple(current)))
                current, room = [], chunk_size
    if current:
        rows.append(Row(tuple(current)))
    return rows


def epoch_order(num_rows: int, seed: int, epoch: int) -> list[int]:
    """A permutation that depends on the seed and the epoch only."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "data order", epoch))
    return torch.randperm(num_rows, generator=generator).tolist()


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step as one rank sees it."""

    micro_batches: list[list[Row]]  # this rank's rows, at most micro_batch_size per batch
    num_targets: int  # supervised tokens of the whole step, over all ranks
    num_tokens: int  # real tokens of the whole step, over all ranks


def optimizer_steps(
    rows: list[Row],
    order: list[int],
    batch_size: int,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[StepPlan]:
    """Each step takes `batch_size` rows in `order`; rank r takes every world_size-th of them.

    Rows are sorted by length inside a step so that the ranks get similar work; the gradient
    of the step is the same whatever the grouping, since the loss is a sum over tokens.
    """
    for start in range(0, len(order), batch_size):
        step_rows = sorted((rows[i] for i in order[start : start + batch_size]), key=len)
        mine = step_rows[rank::world_size]
        yield StepPlan(
            micro_batches=[
                mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)
            ],
            num_targets=sum(r.num_targets for r in step_rows),
            num_tokens=sum(len(r) for r in step_rows),
        )


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
    return -(-num_rows // batch_size)


def longest_segment(rows: list[Row]) -> int:
    """Tokens of the longest segment: what one forward pass must hold at least."""
    return max((len(s.input_ids) for row in rows for s in row.segments), default=0)


def forward_groups(rows: list[Row], max_tokens: int | None) -> list[list[Row]]:
    """Split a micro-batch at segment boundaries into groups of at most `max_tokens` tokens.

    Segments never attend to each other, so running them in several forward passes gives the
    same gradient. The memory plan (src/training/memory.py) sets the limit; a segment longer
    than it goes alone (and the plan checkpoints that pass).
    """
    if max_tokens is None:
        return [rows]
    groups: list[list[Row]] = []
    current: list[Segment] = []
    size = 0
    for segment in (s for row in rows for s in row.segments):
        if current and size + len(segment.input_ids) > max_tokens:
            groups.append([Row(tuple(current))])
            current, size = [], 0
        current.append(segment)
        size += len(segment.input_ids)
    if current:
        groups.append([Row(tuple(current))])
    return groups


def collate(rows: list[Row]) -> MicroBatch:
    """The rows of a micro-batch laid end to end as one sequence of shape (1, N): no padding.

    Position ids restart at every segment, which is all the attention needs to keep them apart
    (src/attention.py, or FlashAttention-2's varlen kernels).
    """
    input_ids: list[int] = []
    positions: list[int] = []
    targets: list[int] = []
    lengths: list[int] = []
    for row in rows:
        for segment in row.segments:
            lengths.append(len(segment.input_ids))
            input_ids += segment.input_ids
            positions += range(len(segment.input_ids))
            # Position i predicts token i + 1 of the same example; the last position of a
            # segment predicts only the continuation of a wrapped fragment.
            targets += [*segment.labels[1:], segment.next_label]
    targets_tensor = torch.tensor([targets])
    return MicroBatch(
        input_ids=torch.tensor([input_ids]),
        position_ids=torch.tensor([positions]),
        targets=targets_tensor,
        num_targets=int((targets_tensor != IGNORE_INDEX).sum()),
        num_real_tokens=len(input_ids),
        segment_lengths=tuple(lengths),
    )
