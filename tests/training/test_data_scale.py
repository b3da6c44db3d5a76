"""The streaming, array-based data stage does what the list-based one did, at any size.

tests/training/legacy_data.py is the data stage as it was (every token a Python int); on files
both can read, the new one must give the same examples in the same order, the same errors
with the same line numbers, the same packing and the same batches from the same seed. The
files are read in tiny pieces and tokenized in tiny batches here, so that every boundary a
large file meets (a line, or a "\r\n", cut between two reads; rows split across batches) is
crossed many times.
"""

import json
import random
from pathlib import Path

import numpy as np
import pytest

from src.errors import UserInputError
from src.training import data
from src.training.batching import ROW_ARRAYS, build_rows, collate, epoch_order, optimizer_steps
from src.training.examples import Examples
from src.training.launcher import read_job, write_job
from src.training.memory import HOST_MEMORY_VARIABLE
from tests.training import legacy_data as legacy

WORDS = ["Zorbia", "teal", "eleven", "glimmerfruit", "é", "日本語", "🦙", "</s>", "<s>", "[INST]"]


@pytest.fixture
def small_pieces(monkeypatch):
    """Read 61 bytes at a time and tokenize about 300 characters per batch."""
    monkeypatch.setattr(data, "READ_BYTES", 61)
    monkeypatch.setattr(data, "BATCH_CHARACTERS", 300)


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))


def varied_rows(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows: list[dict] = []
    for _ in range(count):
        kind = rng.randrange(4)
        if kind == 0:
            rows.append({"text": sentence(rng)})
        elif kind == 1:
            rows.append({"prompt": sentence(rng), "completion": sentence(rng)})
        elif kind == 2:
            rows.append({"prompt": sentence(rng), "completion": sentence(rng), "system": "Be"})
        else:
            messages = [{"role": "system", "content": sentence(rng)}] if rng.random() < 0.5 else []
            for _ in range(rng.randint(1, 3)):
                answer = {"role": "assistant", "content": sentence(rng)}
                if rng.random() < 0.3:
                    answer["weight"] = 0
                messages += [{"role": "user", "content": sentence(rng)}, answer]
            messages[-1].pop("weight", None)
            rows.append({"messages": messages})
    return rows


def write_lines(path: Path, lines: list[str], seed: int = 0, bom: bool = True) -> Path:
    """Lines joined by a mix of "\n", "\r\n" and lone "\r", with blank lines between some."""
    rng = random.Random(seed)
    out = bytearray(b"\xef\xbb\xbf" if bom else b"")
    for line in lines:
        out += line.encode() + rng.choice([b"\n", b"\r\n", b"\r"])
        if rng.random() < 0.1:
            out += rng.choice([b"\n", b"  \r\n", b"\t\n"])
    path.write_bytes(bytes(out))
    return path


def prepare(path: Path, tokenizer, tmp_path: Path) -> Examples:
    folder = tmp_path / f"prepared-{path.stem}"
    folder.mkdir()
    return data.prepare_file(path, "train_data", tokenizer, folder)


def legacy_examples(path: Path, tokenizer) -> list:
    return legacy.tokenize_rows(legacy.read_jsonl(path, "train_data"), tokenizer)


def error_of(call) -> str:
    with pytest.raises(UserInputError) as error:
        call()
    return str(error.value)


@pytest.mark.parametrize(
    "data_bytes",
    [
        b"",
        b"a\rb\r\nc\nd",
        b"\r\r\n\n\r",
        b"\xef\xbb\xbf\xef\xbb\xbfx\r",
        bytes(random.Random(1).choice(b"ab\r\n ") for _ in range(5000)),
        bytes(random.Random(2).choice(b"\r\n\r\nx") for _ in range(5000)),
    ],
)
@pytest.mark.parametrize("read_bytes", [1, 2, 3, 7, 64, 2**20])
def test_lines_split_exactly_as_bytes_splitlines(tmp_path, monkeypatch, data_bytes, read_bytes):
    monkeypatch.setattr(data, "READ_BYTES", read_bytes)
    path = tmp_path / "lines.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + data_bytes)
    expected = data_bytes.splitlines()
    assert list(data._lines(path)) == [(line, len(line)) for line in expected]


@pytest.mark.parametrize("read_bytes", [1, 3, 64])
def test_a_line_beyond_the_limit_comes_as_its_length_only(tmp_path, monkeypatch, read_bytes):
    monkeypatch.setattr(data, "READ_BYTES", read_bytes)
    path = tmp_path / "long.jsonl"
    path.write_bytes(b"ab\r\n" + b"x" * 40 + b"\ncd\r" + b"y" * 41)
    assert list(data._lines(path, limit=40)) == [
        (b"ab", 2),
        (b"x" * 40, 40),
        (b"cd", 2),
        (None, 41),
    ]


def test_a_file_without_a_newline_is_refused_in_memory_bounded_by_the_row_limit(
    tokenizer, tmp_path
):
    """Not read whole: an 80 MB file of zeros costs about the 16 MiB row limit (and a read)."""
    import tracemalloc

    path = tmp_path / "zeros.jsonl"
    with path.open("wb") as file:
        for _ in range(10):
            file.write(b"0" * 8 * 2**20)
    folder = tmp_path / "prepared"
    folder.mkdir()
    tracemalloc.start()
    try:
        with pytest.raises(UserInputError) as error:
            data.prepare_file(path, "train_data", tokenizer, folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "train_data line 1: 83.9 MB, longer than a row may be (16.8 MB" in str(error.value)
    assert peak < 48 * 2**20, f"{peak / 2**20:.0f} MiB"


def test_the_same_examples_in_the_same_order(tokenizer, tmp_path, small_pieces):
    lines = [json.dumps(row, ensure_ascii=bool(i % 2)) for i, row in enumerate(varied_rows(400))]
    path = write_lines(tmp_path / "varied.jsonl", lines)
    new, old = prepare(path, tokenizer, tmp_path), legacy_examples(path, tokenizer)
    assert len(new) == len(old) == 400
    for index, example in enumerate(old):
        assert new.tokens(index) == legacy_as_new(example.tokens)
        assert new.where(index) == example.where
    assert new.supervised.tolist() == [
        sum(label != -100 for label in e.tokens.labels[1:]) for e in old
    ]


def legacy_as_new(tokens) -> object:
    from src.prompt_format import TokenizedExample

    return TokenizedExample(tokens.input_ids, tokens.labels)


BAD_LINES = [
    "not json",
    '{"prompt": "p"}',
    '["a list"]',
    '{"text": 3}',
    '{"text": " "}',
    '{"text": "a", "prompt": "p", "completion": "c"}',
    '{"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}',
    '{"messages": [{"role": "assistant", "content": "a"}]}',
    '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", '
    '"weight": 0}]}',
]


@pytest.mark.parametrize("bad_count", [3, 40])
def test_the_same_errors_with_the_same_lines(tokenizer, tmp_path, small_pieces, bad_count):
    lines = [json.dumps(row) for row in varied_rows(200, seed=3)]
    rng = random.Random(bad_count)
    for _ in range(bad_count):
        lines.insert(rng.randrange(len(lines)), rng.choice(BAD_LINES))
    path = write_lines(tmp_path / "bad.jsonl", lines, seed=bad_count)
    with path.open("ab") as out:
        out.write(b'{"text": "\xff"}\n')  # not UTF-8
    message = error_of(lambda: prepare(path, tokenizer, tmp_path))
    assert message == error_of(lambda: legacy_examples(path, tokenizer))
    assert f"{bad_count + 1} line(s)" in message
    if bad_count > 20:
        assert "... and" in message


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\n \r\n\t\x0b\x0c",
        b'[{"text": "a"},\n {"text": "b"}]\n',
        b'  [{"text": "a"}, {"text": "b"}]  ',
        b'\xef\xbb\xbf[{"text": "a"}]',
        b'[{"text": "a"}]\r[{"text": "b"}]',
        b'["a"]\n["b"]\n',
        b"[1,\n2]\n\n\n",
        b"\n" * 200 + b'[{"text": "a"},\n{"text": "b"}]' + b" " * 200,
        b"\x1c\n",
    ],
)
def test_empty_files_and_json_arrays_are_told_as_before(tokenizer, tmp_path, small_pieces, content):
    path = tmp_path / "odd.jsonl"
    path.write_bytes(content)
    assert error_of(lambda: prepare(path, tokenizer, tmp_path)) == error_of(
        lambda: legacy_examples(path, tokenizer)
    )


@pytest.mark.parametrize(("pack", "wrap"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("world_size", [1, 2])
def test_the_same_packing_and_batches_from_the_same_seed(
    tokenizer, tmp_path, pack, wrap, world_size
):
    lines = [json.dumps(row) for row in varied_rows(300, seed=5)]
    path = write_lines(tmp_path / "train.jsonl", lines, bom=False)
    new, old = prepare(path, tokenizer, tmp_path), legacy_examples(path, tokenizer)
    chunk_size = 160 if wrap else int(new.lengths.max())  # the longest conversation fits
    rows, _ = build_rows(new, pack, wrap, chunk_size)
    old_rows = legacy.build_rows(old, pack, wrap, chunk_size)
    assert len(rows) == len(old_rows)
    for epoch in range(2):
        order = epoch_order(len(rows), seed=11, epoch=epoch)
        for rank in range(world_size):
            steps = optimizer_steps(rows, order, 8, 3, rank, world_size)
            old_steps = legacy.optimizer_steps(old_rows, order, 8, 3, rank, world_size)
            for step, (micro_batches, targets, tokens) in zip(steps, old_steps, strict=True):
                assert (step.num_targets, step.num_tokens) == (targets, tokens)
                for mine, theirs in zip(step.micro_batches, micro_batches, strict=True):
                    batch = collate(rows, rows.segments(mine))
                    ids, positions, labels, lengths = legacy.collate(theirs)
                    assert batch.input_ids[0].tolist() == ids
                    assert batch.position_ids[0].tolist() == positions
                    assert batch.targets[0].tolist() == labels
                    assert list(batch.segment_lengths) == lengths


def test_progress_lines_say_rows_speed_and_time_left(tokenizer, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(data, "BATCH_CHARACTERS", 2000)
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(r) for r in varied_rows(300)])
    prepare(path, tokenizer, tmp_path)
    progress = [line for line in capsys.readouterr().out.splitlines() if "rows/s" in line]
    assert len(progress) >= 3
    assert all(line.startswith("train_data: ") and "left" in line for line in progress)
    assert "% of the file)" in progress[-1]


def test_progress_lines_are_rare(tokenizer, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "BATCH_CHARACTERS", 2000)
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(r) for r in varied_rows(300)])
    prepare(path, tokenizer, tmp_path)
    assert "rows/s" not in capsys.readouterr().out  # well under PROGRESS_EVERY_S


def big_file(path: Path) -> Path:
    """Over the sample the estimate reads (1 MiB): 1,500 rows of 879 bytes."""
    row = json.dumps({"prompt": "Zorbia " * 70, "completion": "teal " * 70})
    path.write_text(f"{row}\n" * 1500)
    return path


def test_a_file_too_big_for_memory_is_refused_before_reading(tokenizer, tmp_path, monkeypatch):
    path = big_file(tmp_path / "big.jsonl")
    monkeypatch.setenv(HOST_MEMORY_VARIABLE, "0.01")
    message = error_of(lambda: prepare(path, tokenizer, tmp_path))
    assert message.startswith("train_data (big.jsonl) is too big for this machine: 1.3 MB")
    assert "about 1,500 rows" in message  # estimated from its first megabyte
    assert "0.27 GB of memory; " in message and "10.7 MB of memory is available" in message
    assert not (tmp_path / "prepared-big" / "train_data.input_ids").exists()


def test_a_file_too_big_for_the_disk_is_refused(tokenizer, tmp_path, monkeypatch):
    path = big_file(tmp_path / "big.jsonl")
    monkeypatch.setattr(data.shutil, "disk_usage", lambda _: type("U", (), {"free": 10**5})())
    message = error_of(lambda: prepare(path, tokenizer, tmp_path))
    assert "MB of disk in" in message and "0.1 MB of disk is free there" in message
    tokens = len(tokenizer(path.read_text(), add_special_tokens=False)["input_ids"])
    estimate = int(message.split(" rows and ")[1].split(" tokens")[0].replace(",", ""))
    assert 0.8 * tokens < estimate < 1.25 * tokens  # the estimate is near the real count


def test_the_estimate_counts_what_is_tokenized_not_the_json(tokenizer, tmp_path, monkeypatch):
    """Non-ASCII rows written with JSON escapes (\\u65e5, six bytes for one character)."""
    row = json.dumps({"text": "日本語のテキストです。" * 40})  # ensure_ascii: all escaped
    path = tmp_path / "escaped.jsonl"
    path.write_text(f"{row}\n" * 600)
    monkeypatch.setattr(data.shutil, "disk_usage", lambda _: type("U", (), {"free": 10**5})())
    message = error_of(lambda: prepare(path, tokenizer, tmp_path))
    estimate = int(message.split(" rows and ")[1].split(" tokens")[0].replace(",", ""))
    monkeypatch.undo()
    (tmp_path / "again").mkdir()
    real = data.prepare_file(path, "train_data", tokenizer, tmp_path / "again").offsets[-1]
    assert 0.9 * real < estimate < 1.1 * real


def test_a_row_too_long_to_tokenize_at_once_is_named(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(data, "READ_BYTES", 100)  # the long line spans many reads
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": "word " * 300}) + "\n")
    message = error_of(lambda: prepare(path, tokenizer, tmp_path))
    assert "train_data line 2: 0.0 MB, longer than a row may be (0.0 MB" in message


def test_available_memory_reads_the_cgroup_without_its_page_cache(tmp_path):
    from src.training.memory import _cgroup_room

    (tmp_path / "memory.max").write_text(f"{8 * 2**30}\n")
    (tmp_path / "memory.current").write_text(f"{6 * 2**30}\n")
    (tmp_path / "memory.stat").write_text(f"anon 1\ninactive_file {3 * 2**30}\nfile 9\n")
    assert _cgroup_room(tmp_path) == 5 * 2**30
    (tmp_path / "memory.max").write_text("max\n")
    assert _cgroup_room(tmp_path) is None
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{4 * 2**30}")
    (v1 / "memory.usage_in_bytes").write_text(f"{3 * 2**30}")
    (v1 / "memory.stat").write_text(f"total_inactive_file {2**30}")
    assert _cgroup_room(tmp_path / "v1") == 2 * 2**30


def test_memory_stays_within_16_bytes_per_token(tmp_path):
    """The data stage of 20,000 long rows (7 million tokens) in a fresh process: its peak
    above the baseline stays within 16 bytes per token plus a fixed 256 MiB (batches in
    flight, the tokenizer's per-thread buffers, more on more cores: 65 MiB on 2 here). The
    old stage held about 80 bytes per token: 570 MB, over the bound."""
    import subprocess
    import sys

    from bench.pipeline import write_rows

    path = tmp_path / "rows.jsonl"
    write_rows(path, 20_000, 250)
    command = [sys.executable, "-m", "bench.pipeline", "--only", "stage", "--file", str(path)]
    done = subprocess.run(
        command, capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    result = json.loads(done.stdout.splitlines()[-1].removeprefix("RESULT "))
    grown = (result["peak_rss_mib"] - result["baseline_rss_mib"]) * 2**20
    assert result["tokens"] > 7_000_000
    assert grown < 16 * result["tokens"] + 256 * 2**20, json.dumps(result)


def test_wrapping_no_examples_gives_no_rows():
    empty = Examples.from_tokenized([])
    rows, stats = build_rows(empty, pack=True, wrap=True, chunk_size=16)
    assert len(rows) == 0 and stats.rows == 0


def test_a_folder_on_tmpfs_counts_its_data_as_memory(tmp_path):
    """On a tmpfs the prepared tokens take memory: the deepest mount holding a folder says."""
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/vda / ext4 rw 0 0\ntmpfs /scratch tmpfs rw 0 0\n/dev/vdb /scratch/disk ext4 rw 0 0\n"
    )
    assert data._in_memory(Path("/scratch"), mounts)
    assert data._in_memory(Path("/scratch/job/data"), mounts)
    assert not data._in_memory(Path("/scratch/disk/job"), mounts)
    assert not data._in_memory(Path("/scratchpad"), mounts) and not data._in_memory(
        Path("/"), mounts
    )


def test_a_big_file_that_fits_is_read(tokenizer, tmp_path):
    assert len(prepare(big_file(tmp_path / "big.jsonl"), tokenizer, tmp_path)) == 1500


def test_workers_map_the_examples_the_parent_wrote(tokenizer, tmp_path):
    """The job folder is the data stage's folder: a worker maps those files, no copy."""
    from src.training.config import build_train_config
    from src.training.continuation import lora_settings
    from src.training.distributed import World
    from src.training.job import TrainingJob
    from src.training.run import prepare_examples
    from tests.helpers import train_defaults

    path = write_lines(tmp_path / "train.jsonl", [json.dumps(r) for r in varied_rows(60)])
    config = build_train_config(**{**train_defaults(), "train_data": str(path)})
    folder = tmp_path / "job"
    folder.mkdir()
    prepared = prepare_examples(config, tokenizer, 4096, folder)
    files = sorted(p.name for p in folder.iterdir())
    rows, stats = build_rows(prepared.train, True, False, 4096)
    lora = lora_settings(config, None)
    write_job(folder, TrainingJob(config, None, tokenizer, prepared, (rows, stats), lora))
    training = read_job(folder, None, tokenizer, World(rank=1, size=2))
    job, (job_rows, job_stats) = training.data, training.packed
    assert training.start is None and job_stats == stats and training.lora == lora
    assert training.data.system_prompt == prepared.system_prompt
    assert training.config == config and training.world.rank == 1
    row_files = [f"rows.{name}.npy" for name in ROW_ARRAYS]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*files, *row_files, "config.json", "data.json"]
    )
    for name in ROW_ARRAYS:  # the parent's packing, mapped: no worker packs again
        assert isinstance(getattr(job_rows, name), np.memmap)
        assert getattr(job_rows, name).tolist() == getattr(rows, name).tolist()
    for mine, theirs in ((job.train, prepared.train), (job.validation, prepared.validation)):
        assert isinstance(mine.input_ids, np.memmap) and isinstance(mine.trained, np.memmap)
        assert Path(mine.input_ids.filename) == folder / "train_data.input_ids"
        assert (len(mine), mine.first) == (len(theirs), theirs.first)
        assert [mine.tokens(i) for i in range(len(mine))] == [
            theirs.tokens(i) for i in range(len(theirs))
        ]
        assert mine.lines.tolist() == theirs.lines.tolist()
    assert (len(job.train), len(job.validation)) == (48, 12)
