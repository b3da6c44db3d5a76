"""The one format of tokenized training data: examples end to end in flat arrays.

As Megatron's indexed datasets store them: every token id of a file in one int32 array, a
flag per token saying whether it is a label, the offset where each example starts, and the
line of the file it came from. Labels are not stored: a trained token's label is its own id,
any other's IGNORE_INDEX. That is 5 bytes per token, where lists of Python ints took about 80.

The data stage (src/training/data.py) appends examples to files in a folder while it streams
a JSONL file; training maps them back (np.memmap), so the tokens stay in the page cache, shared
by every data-parallel worker, instead of in each process's memory. Files of one source:

    {source}.input_ids   int32, every token
    {source}.trained     bool, per token: is it a label
    {source}.offsets     int64, examples + 1: example i is tokens offsets[i]:offsets[i + 1]
    {source}.lines       int64, per example: its line in the file
    {source}.supervised  int64, per example: its labels but the first token's (the targets)
    {source}.json        {"examples": n, "tokens": t}
"""

import json
import shutil
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from src.errors import UserInputError
from src.prompt_format import IGNORE_INDEX, TokenizedExample

ARRAYS = {
    "input_ids": np.int32,
    "trained": np.bool_,
    "offsets": np.int64,
    "lines": np.int64,
    "supervised": np.int64,
}
BYTES_PER_TOKEN = 5  # int32 id + bool flag, on disk and in the page cache


@dataclass(frozen=True)
class Examples:
    """Examples `first` to `first + len(self)` of what `source` holds (see the module doc).

    `offsets` are positions in `input_ids`/`trained`, so a slice of examples shares the arrays.
    """

    source: str  # "train_data" or "validation_data": where messages point, and the file names
    input_ids: np.ndarray
    trained: np.ndarray
    offsets: np.ndarray
    lines: np.ndarray
    supervised: np.ndarray  # targets per example: its labels but the first token's
    first: int = 0

    def __len__(self) -> int:
        return len(self.lines)

    @cached_property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1] - self.offsets[0])

    def where(self, index: int) -> str:
        return f"{self.source} line {self.lines[index]}"

    def labels(self, begin: int, end: int) -> np.ndarray:
        """Labels of tokens begin:end (positions in the arrays, not in one example)."""
        ids = self.input_ids[begin:end]
        return np.where(self.trained[begin:end], ids, IGNORE_INDEX)

    def tokens(self, index: int) -> TokenizedExample:
        begin, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return TokenizedExample(
            self.input_ids[begin:end].tolist(), self.labels(begin, end).tolist()
        )

    def select(self, start: int, stop: int) -> "Examples":
        """Examples start:stop, sharing the token arrays."""
        return replace(
            self,
            offsets=self.offsets[start : stop + 1],
            lines=self.lines[start:stop],
            supervised=self.supervised[start:stop],
            first=self.first + start,
        )

    def describe(self) -> dict:
        """Where these examples are in a folder: what `Examples.open(...).select` takes."""
        return {"source": self.source, "first": self.first, "count": len(self)}

    @classmethod
    def open(cls, folder: Path, source: str) -> "Examples":
        """The examples a writer stored in `folder`, the token arrays mapped, not read."""
        counts = json.loads((folder / f"{source}.json").read_text())
        sizes = {"input_ids": counts["tokens"], "trained": counts["tokens"]}
        sizes |= {"offsets": counts["examples"] + 1}
        sizes |= {"lines": counts["examples"], "supervised": counts["examples"]}
        arrays = {
            name: _map(folder / f"{source}.{name}", dtype, sizes[name])
            for name, dtype in ARRAYS.items()
        }
        return cls(source, **arrays)

    @classmethod
    def from_tokenized(
        cls, examples: list[TokenizedExample], source: str = "train_data"
    ) -> "Examples":
        """In memory, from lists (tests, benchmarks); line i + 1 holds example i."""
        lengths = np.array([len(e.input_ids) for e in examples], np.int64)
        trained = np.array([label != IGNORE_INDEX for e in examples for label in e.labels], bool)
        return cls(
            source,
            np.array([t for e in examples for t in e.input_ids], np.int32),
            trained,
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            np.arange(1, len(examples) + 1, dtype=np.int64),
            count_targets(trained, lengths),
        )


def count_targets(trained: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Targets of examples laid end to end: their labels but each first token's."""
    if not len(lengths):
        return np.zeros(0, np.int64)
    starts = np.cumsum(lengths) - lengths
    return np.add.reduceat(trained, starts, dtype=np.int64) - trained[starts]


def _map(path: Path, dtype: type, size: int) -> np.ndarray:
    if size == 0:  # an empty file cannot be mapped
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(size,))


class ExampleWriter:
    """Appends examples, batch by batch, to the files of `source` in `folder`."""

    def __init__(self, folder: Path, source: str) -> None:
        self.folder, self.source = folder, source
        self.files = {name: (folder / f"{source}.{name}").open("wb") for name in ARRAYS}
        np.zeros(1, np.int64).tofile(self.files["offsets"])
        self.examples = self.tokens = 0

    def add(
        self, input_ids: np.ndarray, trained: np.ndarray, lengths: np.ndarray, lines: np.ndarray
    ) -> None:
        """A batch of examples: their tokens end to end, their lengths and lines."""
        offsets = self.tokens + np.cumsum(lengths, dtype=np.int64)
        supervised = count_targets(trained, lengths)
        try:
            for name, values in (
                ("input_ids", input_ids), ("trained", trained), ("offsets", offsets),
                ("lines", lines), ("supervised", supervised),
            ):  # fmt: skip
                np.ascontiguousarray(values, ARRAYS[name]).tofile(self.files[name])
        except OSError as error:  # numpy says "N requested and M written" when the disk is full
            raise self._out_of_room(error) from error
        self.examples += len(lengths)
        self.tokens += int(lengths.sum())

    def _out_of_room(self, error: OSError) -> UserInputError:
        free = shutil.disk_usage(self.folder).free
        return UserInputError(
            f"{self.source}: the disk ran out of room while its tokenized rows were written "
            f"to {self.folder.parent} ({free / 1e6:,.1f} MB free; the data takes about "
            f"{BYTES_PER_TOKEN} bytes per token, {self.tokens:,} tokens written so far): free "
            f"some room there, or set TMPDIR to a folder with more ({error})"
        )

    def finish(self) -> Examples:
        try:
            for file in self.files.values():
                file.close()
        except OSError as error:
            raise self._out_of_room(error) from error
        # A full disk does not always fail a write: numpy's buffered writes can lose bytes
        # silently (the file is then short), so every file is measured.
        counts = {"input_ids": self.tokens, "trained": self.tokens, "offsets": self.examples + 1}
        for name, dtype in ARRAYS.items():
            expected = counts.get(name, self.examples) * np.dtype(dtype).itemsize
            written = (self.folder / f"{self.source}.{name}").stat().st_size
            if written != expected:
                raise self._out_of_room(OSError(f"{name}: {expected} bytes, {written} written"))
        counts = {"examples": self.examples, "tokens": self.tokens}
        (self.folder / f"{self.source}.json").write_text(json.dumps(counts))
        return Examples.open(self.folder, self.source)
