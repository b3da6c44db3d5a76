"""From tokenized examples to micro-batches: packing, the data order and exact batch semantics.

A *row* is one line of a batch: a sequence of *segments* (whole examples, or fragments of
examples in wrap mode). Without packing a row is one example. Every segment starts its own
position ids at 0 and the attention keeps segments apart by them (no token attends across a
segment boundary), so a micro-batch is its rows laid end to end, with no padding at all.

An optimizer step takes exactly `train_batch_size` rows (the last step of an epoch takes what
is left), split into micro-batches of at most `micro_batch_size` rows.
"""

import bisect
import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from src.prompt_format import IGNORE_INDEX
from src.seeds import derive_seed
from src.training.examples import Examples

ROW_ARRAYS = ("begins", "ends", "limits", "offsets", "segment_targets")


@dataclass(frozen=True)
class Rows:
    """Training rows over tokenized examples, as arrays (a million rows are a few arrays, not
    a million objects). Segment s is tokens begins[s]:ends[s] of the examples' token arrays,
    inside an example that ends at limits[s]: a fragment that stops short of its example's end
    is trained on the token after it too. Row r is segments offsets[r]:offsets[r + 1]."""

    examples: Examples
    begins: np.ndarray
    ends: np.ndarray
    limits: np.ndarray
    offsets: np.ndarray
    segment_targets: np.ndarray  # supervised positions of each segment

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @cached_property
    def segment_lengths(self) -> np.ndarray:
        return self.ends - self.begins

    @cached_property
    def lengths(self) -> np.ndarray:
        return _per_row(self.segment_lengths, self.offsets)

    @cached_property
    def num_targets(self) -> np.ndarray:
        return _per_row(self.segment_targets, self.offsets)

    def segments(self, rows: np.ndarray) -> np.ndarray:
        """The segments of `rows`, row after row."""
        if not len(rows):
            return np.zeros(0, np.int64)
        starts, stops = self.offsets[rows], self.offsets[rows + 1]
        counts = stops - starts
        return np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(counts.sum())

    def save(self, folder: Path) -> None:
        """Into a data-parallel job's folder, so that workers map the rows, not pack again."""
        for name in ROW_ARRAYS:
            np.save(folder / f"rows.{name}.npy", getattr(self, name))

    @classmethod
    def open(cls, folder: Path, examples: Examples) -> "Rows":
        arrays = {name: np.load(folder / f"rows.{name}.npy", mmap_mode="r") for name in ROW_ARRAYS}
        return cls(examples, **arrays)

    @property
    def longest_segment(self) -> int:
        """Tokens of the longest segment: what one forward pass must hold at least."""
        return int(self.segment_lengths.max(initial=0))


def _per_row(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    totals = np.zeros(len(offsets) - 1, np.int64)
    filled = offsets[1:] > offsets[:-1]
    if filled.any():
        totals[filled] = np.add.reduceat(values, offsets[:-1][filled], dtype=np.int64)
    return totals


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
    # Built on the host, so that the loss gathers its positions without asking the device
    # which they are (a boolean mask would sync the host with the GPU at every pass):
    supervised_positions: torch.Tensor  # (T,) int64: the positions whose target is a token
    supervised_targets: torch.Tensor  # (T,) int64: those targets
    num_targets: int
    num_real_tokens: int
    segment_lengths: tuple[int, ...]  # for the attention (src/attention.PackedSegments)


def build_rows(
    examples: Examples, pack: bool, wrap: bool, chunk_size: int
) -> tuple[Rows, PackingStats]:
    """Rows for training: one per example, packed best-fit-decreasing, or wrapped.

    Packing without wrap takes examples of at most `chunk_size` tokens (longer ones are a
    user error, raised with their lines by src.training.data.check_lengths before this runs).
    """
    real = examples.num_tokens
    starts, stops = examples.offsets[:-1], examples.offsets[1:]
    targets = examples.supervised
    if not pack:
        rows = Rows(examples, starts, stops, stops, np.arange(len(examples) + 1), targets)
        return rows, PackingStats(len(rows), real, real)
    if wrap:
        rows = _wrap(examples, chunk_size)
        return rows, PackingStats(len(rows), real, len(rows) * chunk_size)
    longest = int(examples.lengths.max(initial=0))
    if longest > chunk_size:
        raise ValueError(f"an example of {longest} tokens does not fit chunk_size {chunk_size}")
    order, offsets = _best_fit_decreasing(examples.lengths, chunk_size)
    rows = Rows(examples, starts[order], stops[order], stops[order], offsets, targets[order])
    return rows, PackingStats(len(rows), real, len(rows) * chunk_size)


def _best_fit_decreasing(sizes: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Longest first, each into the fullest row that still has room (the first made, among
    equally full ones): nothing is dropped. Returns the items row by row, and row offsets.

    Rows are kept in buckets by the room they have left, so each item costs a search among
    at most `capacity` distinct rooms, not among all rows.
    """
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # room left -> heap of the rows with that room
    rooms: list[int] = []  # sorted rooms that some row has
    for item in np.argsort(-sizes, kind="stable").tolist():
        size = int(sizes[item])
        at = bisect.bisect_left(rooms, size)
        if at == len(rooms):
            rows.append([item])
            index, room = len(rows) - 1, capacity
        else:
            room = rooms[at]
            index = heapq.heappop(by_room[room])
            if not by_room[room]:
                del by_room[room], rooms[at]
            rows[index].append(item)
        left = room - size
        if left not in by_room:
            by_room[left] = []
            bisect.insort(rooms, left)
        heapq.heappush(by_room[left], index)
    items = np.fromiter((item for row in rows for item in row), np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(row) for row in rows], dtype=np.int64)])
    return items, offsets.astype(np.int64)


def _wrap(examples: Examples, chunk_size: int) -> Rows:
    """Cut the stream of all examples into rows of exactly chunk_size tokens (but the last).

    A fragment that continues in the next row carries the label of the token that follows
    it, so its last position is still trained: every label of every example is trained once.
    """
    start, stop = int(examples.offsets[0]), int(examples.offsets[-1])
    if start == stop:
        return build_rows(examples, pack=False, wrap=False, chunk_size=chunk_size)[0]
    row_cuts = np.arange(start, stop, chunk_size, dtype=np.int64)
    cuts = np.union1d(examples.offsets[:-1], row_cuts)
    ends = np.append(cuts[1:], stop)
    limits = examples.offsets[np.searchsorted(examples.offsets, cuts, side="right")]
    row_of = (cuts - start) // chunk_size
    offsets = np.searchsorted(row_of, np.arange(len(row_cuts) + 1))
    return Rows(
        examples,
        cuts,
        ends,
        limits,
        offsets.astype(np.int64),
        _targets(examples, cuts, ends, limits),
    )


def _targets(
    examples: Examples, begins: np.ndarray, ends: np.ndarray, limits: np.ndarray
) -> np.ndarray:
    """Supervised positions of fragments that tile the examples' tokens in order: every label
    but a fragment's first, and the label after it where its example goes on."""
    if not len(begins):
        return np.zeros(0, np.int64)
    trained = examples.trained
    start = int(begins[0])
    sums = np.add.reduceat(trained[start : int(ends[-1])], begins - start, dtype=np.int64)
    goes_on = ends < limits
    carried = np.zeros(len(begins), np.int64)
    carried[goes_on] = trained[ends[goes_on]]
    return sums - trained[begins] + carried


def epoch_order(num_rows: int, seed: int, epoch: int) -> list[int]:
    """A permutation that depends on the seed and the epoch only."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "data order", epoch))
    return torch.randperm(num_rows, generator=generator).tolist()


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step as one rank sees it."""

    micro_batches: list[np.ndarray]  # this rank's rows, at most micro_batch_size per batch
    num_targets: int  # supervised tokens of the whole step, over all ranks
    num_tokens: int  # real tokens of the whole step, over all ranks


def optimizer_steps(
    rows: Rows,
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
        taken = np.array(order[start : start + batch_size], np.int64)
        step_rows = taken[np.argsort(rows.lengths[taken], kind="stable")]
        mine = step_rows[rank::world_size]
        yield StepPlan(
            micro_batches=[
                mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)
            ],
            num_targets=int(rows.num_targets[step_rows].sum()),
            num_tokens=int(rows.lengths[step_rows].sum()),
        )


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
    return -(-num_rows // batch_size)


def forward_groups(rows: Rows, row_ids: np.ndarray, max_tokens: int | None) -> list[np.ndarray]:
    """The segments of a micro-batch's rows, split at segment boundaries into groups of at
    most `max_tokens` tokens.

    Segments never attend to each other, so running them in several forward passes gives the
    same gradient. The memory plan (src/training/memory.py) sets the limit; a segment longer
    than it goes alone (and the plan checkpoints that pass).
    """
    segments = rows.segments(np.asarray(row_ids, np.int64))
    if max_tokens is None:
        return [segments]
    groups: list[np.ndarray] = []
    first, size = 0, 0
    for index, length in enumerate(rows.segment_lengths[segments].tolist()):
        if index > first and size + length > max_tokens:
            groups.append(segments[first:index])
            first, size = index, 0
        size += length
    if len(segments):
        groups.append(segments[first:])
    return groups


def _host(values: np.ndarray, unsqueeze: bool = False) -> torch.Tensor:
    """An int64 tensor for the device, in pinned memory where there is a GPU, so that its copy
    to the device does not wait for the host (`non_blocking=True` copies from pageable memory
    are synchronous)."""
    tensor = torch.from_numpy(np.ascontiguousarray(values, np.int64))
    if torch.cuda.is_available():
        tensor = tensor.pin_memory()
    return tensor.unsqueeze(0) if unsqueeze else tensor


def collate(rows: Rows, segments: np.ndarray) -> MicroBatch:
    """Segments laid end to end as one sequence of shape (1, N): no padding.

    Position ids restart at every segment, which is all the attention needs to keep them apart
    (src/attention.py, or FlashAttention-2's varlen kernels). Position i predicts token i + 1
    of the same example; the last position of a segment predicts only the continuation of a
    wrapped fragment.
    """
    examples = rows.examples
    input_ids, targets = [], []
    for begin, end, limit in zip(
        rows.begins[segments].tolist(),
        rows.ends[segments].tolist(),
        rows.limits[segments].tolist(),
        strict=True,
    ):
        input_ids.append(examples.input_ids[begin:end])
        following = examples.labels(begin + 1, min(end + 1, limit))
        targets.append(following if end < limit else np.append(following, IGNORE_INDEX))
    lengths = rows.segment_lengths[segments]
    total = int(lengths.sum())
    positions = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    ids = np.concatenate(input_ids) if input_ids else np.zeros(0, np.int32)
    target_array = np.concatenate(targets) if targets else np.zeros(0, np.int64)
    supervised = np.flatnonzero(target_array != IGNORE_INDEX)
    return MicroBatch(
        input_ids=_host(ids, unsqueeze=True),
        position_ids=_host(positions, unsqueeze=True),
        targets=_host(target_array, unsqueeze=True),
        supervised_positions=_host(supervised),
        supervised_targets=_host(target_array[supervised]),
        num_targets=len(supervised),
        num_real_tokens=total,
        segment_lengths=tuple(lengths.tolist()),
    )
