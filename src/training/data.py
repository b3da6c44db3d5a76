"""Reading, checking, tokenizing and splitting the user's JSONL data, streamed at any size.

Each line holds one JSON object: {"text": ...}, {"prompt": ..., "completion": ...} with an
optional "system", or a conversation {"messages": [{"role": ..., "content": ...}, ...]}
(OpenAI's chat fine-tuning format); the forms may be mixed in one file. Every problem is
reported with the file and line before any model is loaded.

A file is read in batches of lines: each batch is checked, tokenized and appended to the
arrays of src/training/examples.py, then dropped, so memory does not grow with the file's
text, and no Python object per token is ever made. Lines are numbered as bytes.splitlines
numbers them (a lone carriage return ends a line too).
"""

import json
import shutil
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from src.errors import QUOTED_CHARACTERS, Problems, UserInputError, quoted, raise_all
from src.local_files import special_file_problem
from src.log import format_duration, log
from src.prompt_format import (
    Dialog,
    Piece,
    SystemPromptTally,
    Tokenizer,
    TrainedSystemPrompt,
    Turn,
    assemble_pieces,
    dialog_pieces,
    encode_batch,
    encode_texts,
    text_pieces,
    token_ids,
)
from src.training.examples import BYTES_PER_TOKEN, Examples, ExampleWriter
from src.training.memory import available_host_memory

TEXT_FIELDS = {"text", "prompt", "completion", "system"}
KNOWN_FIELDS = TEXT_FIELDS | {"messages"}
ROLES = ("system", "user", "assistant")
MESSAGE_FIELDS = {"role", "content", "weight"}
TOOL_KEYS = {"tool_calls", "function_call", "tool_call_id"}
UTF8_BOM = b"\xef\xbb\xbf"  # what some editors write at the start of a UTF-8 file
MAX_VALIDATION_SHARE = 5  # never hold out more than a fifth of the training rows
READ_BYTES = 8 * 2**20  # the file is read in pieces of this size
BATCH_CHARACTERS = 2**20  # text per tokenizer call: enough to keep every core busy
BATCHES_IN_FLIGHT = 2  # queued for the tokenizer, so that it never waits for this thread
PROGRESS_EVERY_S = 15.0  # at most one progress line per this many seconds
SAMPLE_BYTES = 2**20  # the head of a file that its size is estimated from
MAX_LINE_BYTES = 16 * 2**20  # a longer row would take gigabytes to tokenize at once
MEMORY_PER_ROW = 128  # bytes held per example through training (offsets, segments, order)
MEMORY_WORKING_SET = 256 * 2**20  # batches in flight, the tokenizer's buffers
NO_CHAT_ROWS = TrainedSystemPrompt(None, 0, 0, 0)


@dataclass(frozen=True)
class TrainingData:
    """The tokenized examples of a run, stored in `folder`: trained on, and validated on."""

    train: Examples
    validation: Examples
    folder: Path
    # the system prompt of train_data's chat rows (predict.py prompts the adapter with it)
    system_prompt: TrainedSystemPrompt = NO_CHAT_ROWS


COMPRESSED = {  # what a compressed file starts with
    b"\x1f\x8b": ("gzip", "gunzip"),
    b"\x28\xb5\x2f\xfd": ("zstd", "unzstd"),
    b"BZh": ("bzip2", "bunzip2"),
    b"\xfd7zXZ\x00": ("xz", "unxz"),
    b"PK\x03\x04": ("zip", "unzip"),
}


def check_data_file(path: Path, name: str) -> None:
    """Refuse what is no data file before reading it: a device, a FIFO, a socket, or a file
    under /proc, /sys or /dev (a local path is read from the server's own disk), and say
    so when a file is compressed."""
    problem = special_file_problem(path, name)
    if problem:
        raise UserInputError(f"{problem}: give a JSONL file")
    with path.open("rb") as file:
        head = file.read(8)
    for magic, (kind, command) in COMPRESSED.items():
        if head.startswith(magic):
            raise UserInputError(
                f"{name} ({path.name}) looks compressed ({kind}): decompress it first (for "
                f"example with `{command}`) and give the JSONL file itself"
            )


def prepare_file(
    path: Path,
    name: str,
    tokenizer: Tokenizer,
    folder: Path,
    systems: SystemPromptTally | None = None,
) -> Examples:
    """Read, check and tokenize a JSONL file, writing its examples into `folder`; the system
    prompts of its chat rows are counted into `systems`.

    A thread feeds the tokenizer batch after batch (it releases the GIL and uses every core)
    while this one parses the next batches and assembles the tokens of the last: all the
    Python work overlaps the tokenization. Every bad line is found and raised together at the
    end; after the first, lines are only checked, no longer tokenized.
    """
    check_data_file(path, name)
    size = path.stat().st_size
    _refuse_empty_or_array(path, name)
    check_room(path, name, tokenizer, folder)
    writer = ExampleWriter(folder, name)
    reader = RowReader(name, size, systems)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pending: deque[tuple[_Batch, Future]] = deque()
    with ThreadPoolExecutor(max_workers=1) as tokenizer_thread:
        for batch in reader.batches(path):
            if reader.problems:
                pending.clear()
                continue
            texts = [p.text for p in batch.pieces]
            pending.append((batch, tokenizer_thread.submit(encode_batch, tokenizer, texts)))
            if len(pending) > BATCHES_IN_FLIGHT:
                done, encoded = pending.popleft()
                done.write(writer, token_ids(encoded.result()), bos, eos)
        while pending and not reader.problems:
            done, encoded = pending.popleft()
            done.write(writer, token_ids(encoded.result()), bos, eos)
    examples = writer.finish()
    reader.finish(path, len(examples))
    return examples


@dataclass
class _Batch:
    """Rows read but not yet tokenized: their pieces, and where each row starts."""

    pieces: list[Piece] = field(default_factory=list)
    row_starts: list[int] = field(default_factory=list)  # index of each row's first piece
    lines: list[int] = field(default_factory=list)
    characters: int = 0

    def add(self, line: int, row: str | Dialog) -> None:
        pieces = text_pieces(row) if isinstance(row, str) else dialog_pieces(row)
        self.row_starts.append(len(self.pieces))
        self.lines.append(line)
        self.pieces += pieces
        self.characters += sum(len(p.text) for p in pieces)

    def write(self, writer: ExampleWriter, piece_ids: list[list[int]], bos: int, eos: int) -> None:
        ids, trained, piece_lengths = assemble_pieces(self.pieces, piece_ids, bos, eos)
        lengths = np.add.reduceat(piece_lengths, np.array(self.row_starts))
        writer.add(ids, trained, lengths, np.array(self.lines, np.int64))


class RowReader:
    """Lines to checked rows, batch by batch; the problems and unknown fields of a file."""

    def __init__(self, name: str, size: int, systems: SystemPromptTally | None = None) -> None:
        self.name, self.size = name, size
        self.systems = systems
        self.problems = Problems()
        self.bad_lines = 0
        self.unknown: set[str] = set()
        self.started = self.last_report = time.monotonic()

    def batches(self, path: Path) -> Iterator[_Batch]:
        batch = _Batch()
        rows = consumed = 0
        for number, (raw, length) in enumerate(_lines(path), start=1):
            consumed += length + 1
            row = self.row(number, raw, length)
            if row is None:
                continue
            if self.systems is not None and isinstance(row, Dialog):
                self.systems.add(row.system)
            batch.add(number, row)
            rows += 1
            if batch.characters >= BATCH_CHARACTERS:
                yield batch
                batch = _Batch()
                self._report(rows, consumed)
        if batch.pieces:
            yield batch

    def row(self, number: int, raw: bytes | None, length: int) -> str | Dialog | None:
        """The checked row of a line (None: blank or bad); `raw` is None for a line longer
        than MAX_LINE_BYTES, of which only the `length` was kept."""
        where = f"{self.name} line {number}"
        known = len(self.problems)
        if raw is None or length > MAX_LINE_BYTES:
            self.problems.append(
                f"{where}: {_size(length)}, longer than a row may be ({_size(MAX_LINE_BYTES)}:"
                f" tokenizing one row takes about 100 times its size in memory); split it"
            )
            self.bad_lines += 1
            return None
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            self.problems.append(f"{where}: not valid UTF-8 (byte {error.start + 1} of the line)")
            self.bad_lines += 1
            return None
        if not line.strip():
            return None  # blank lines carry no data
        row = _parse_line(line, where, self.problems, self.unknown)
        self.bad_lines += len(self.problems) > known
        return row

    def _report(self, rows: int, consumed: int) -> None:
        now = time.monotonic()
        if now - self.last_report < PROGRESS_EVERY_S:
            return
        self.last_report = now
        elapsed = now - self.started
        share = min(1.0, consumed / self.size)
        left = elapsed * (1 - share) / share if share else 0.0
        log(
            f"{self.name}: {rows:,} rows read and tokenized ({share:.0%} of the file), "
            f"{rows / elapsed:,.0f} rows/s, about {format_duration(left)} left"
        )

    def finish(self, path: Path, rows: int) -> None:
        raise_all(
            self.problems,
            f"{self.name} ({path.name}) has {len(self.problems)} problem(s) in "
            f"{self.bad_lines} line(s):",
        )
        if not rows:
            raise UserInputError(f"{self.name} ({path.name}) holds no rows")
        if self.unknown:
            log(f"{self.name}: ignoring unknown field(s) {', '.join(sorted(self.unknown))}")
        if time.monotonic() - self.started >= PROGRESS_EVERY_S:
            log(f"{self.name}: {rows:,} rows in {format_duration(time.monotonic() - self.started)}")


def _lines(path: Path, limit: int = MAX_LINE_BYTES) -> Iterator[tuple[bytes | None, int]]:
    """The file's lines without their endings, as bytes.splitlines gives them for the whole
    file (its UTF-8 byte-order mark dropped), read piece by piece, each with its length. A
    line longer than a piece is gathered until its end comes; one longer than `limit` comes
    as None with its length, its bytes dropped as they are read, so that memory stays bounded
    by the limit whatever the file (a file of zeros without a newline, for one)."""
    with path.open("rb") as file:
        head = file.read(len(UTF8_BOM)).removeprefix(UTF8_BOM)
        pending = [head] if head else []  # the start of a line that goes on
        held = len(head)  # the bytes in `pending`
        dropped = 0  # bytes of the line that goes on, dropped: it is longer than the limit
        while True:
            chunk = file.read(READ_BYTES)
            if chunk and b"\n" not in chunk and b"\r" not in chunk:
                if pending and pending[-1].endswith(b"\r"):  # a lone "\r" ended that line
                    line = b"".join(pending)[:-1]
                    length, dropped = dropped + len(line), 0
                    yield (None if length > limit else line), length
                    pending, held = [], 0
                if dropped or held + len(chunk) > limit:
                    dropped, pending, held = dropped + held + len(chunk), [], 0
                else:
                    pending.append(chunk)
                    held += len(chunk)
                continue
            lines = b"".join([*pending, chunk]).splitlines(keepends=True)
            # The last line may go on in the next piece; "\r" may be half of "\r\n".
            goes_on = bool(chunk and lines and not lines[-1].endswith(b"\n"))
            last = lines.pop() if goes_on else b""
            for line in lines:
                line = line.removesuffix(b"\n").removesuffix(b"\r")
                length, dropped = dropped + len(line), 0
                yield (None if length > limit else line), length
            if not chunk:
                if dropped:  # the file ends inside a line that is too long
                    yield None, dropped
                return
            pending, held = ([last], len(last)) if last else ([], 0)


def _refuse_empty_or_array(path: Path, name: str) -> None:
    """An empty file, or one JSON array of rows (a common mistake), gets one error that says so.

    The array is recognised without reading the whole file: it opens with "[" and closes with
    "]", and is one line or its first line is not a JSON value of its own.
    """
    bounds = _content_bounds(path)
    if bounds is None:
        raise UserInputError(f"{name} ({path.name}) is empty: it needs one JSON object per line")
    first, last = bounds
    with path.open("rb") as file:
        file.seek(first)
        opens = file.read(1) == b"["
        file.seek(last)
        closes = file.read(1) == b"]"
        if not (opens and closes):
            return
        file.seek(first)
        line = b""  # the first line, read no further than a row may be long
        while b"\n" not in line and file.tell() <= last and len(line) <= MAX_LINE_BYTES:
            line += file.read(READ_BYTES)
    first_line, newline, _ = line.partition(b"\n")
    if newline and first + len(first_line) < last:
        try:
            json.loads(first_line)
            return  # JSONL whose rows are arrays: the line-by-line checks say so
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    raise UserInputError(
        f"{name} ({path.name}) is one JSON array, not JSONL: write one JSON object per line, "
        f"without the enclosing [ ] (for example with `jq -c '.[]' {path.name} > data.jsonl`)"
    )


def _content_bounds(path: Path) -> tuple[int, int] | None:
    """Offsets of the first and the last byte that is not ASCII blank (after a byte-order
    mark), or None if there is none; read from both ends, not whole."""
    size = path.stat().st_size
    with path.open("rb") as file:
        start = len(UTF8_BOM) if file.read(len(UTF8_BOM)) == UTF8_BOM else 0
        first, position = None, start
        file.seek(start)
        while first is None and (chunk := file.read(READ_BYTES)):
            stripped = chunk.lstrip()
            if stripped:
                first = position + len(chunk) - len(stripped)
            position += len(chunk)
        if first is None:
            return None
        end = max(size, position)  # what was read, should the size have said less
        while end > first:
            begin = max(first, end - READ_BYTES)
            file.seek(begin)
            stripped = file.read(end - begin).rstrip()
            if stripped:
                return first, begin + len(stripped) - 1
            end = begin
        return first, first  # never reached for a regular file (check_data_file)


def check_room(path: Path, name: str, tokenizer: Tokenizer, folder: Path) -> None:
    """Refuse, before reading it, a file whose examples would not fit the disk under `folder`
    or the memory left, estimated from its size and what its first megabyte holds (its rows
    parsed and tokenized as the stage will: escapes such as \\u65e5 are one character)."""
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(SAMPLE_BYTES)
    if len(head) == size:
        return  # small files fit
    lines = head.splitlines(keepends=True)[:-1] or [head]  # whole lines only
    sample = sum(map(len, lines))
    reader, pieces = RowReader(name, size), []
    for number, line in enumerate(lines, start=1):
        line = line.rstrip(b"\r\n")
        row = reader.row(number, line, len(line))
        if row is not None:
            pieces += text_pieces(row) if isinstance(row, str) else dialog_pieces(row)
    encoded = encode_texts(tokenizer, [p.text for p in pieces])
    sample_tokens = sum(map(len, encoded)) + sum(p.bos + p.eos for p in pieces)
    rows, tokens = size * len(lines) // sample, size * sample_tokens // sample
    disk = tokens * BYTES_PER_TOKEN
    memory = rows * MEMORY_PER_ROW + MEMORY_WORKING_SET
    if _in_memory(folder):  # a tmpfs: the "disk" is memory too
        memory += disk
    free_disk = shutil.disk_usage(folder).free
    free_memory = available_host_memory()
    if disk <= free_disk and memory <= free_memory:
        return
    raise UserInputError(
        f"{name} ({path.name}) is too big for this machine: {_size(size)}, about {rows:,} rows "
        f"and {tokens:,} tokens (estimated from its first {len(lines):,} lines). Preparing it "
        f"needs about {_size(disk)} of disk in {folder.parent} ({BYTES_PER_TOKEN} bytes per "
        f"token) and {_size(memory)} of memory; {_size(free_disk)} of disk is free there and "
        f"{_size(free_memory)} of memory is available. Split the file, or train on a machine "
        f"with more room."
    )


def _in_memory(folder: Path, mounts_file: Path = Path("/proc/mounts")) -> bool:
    """Whether `folder` is on a tmpfs (the deepest mount that holds it)."""
    try:
        mounts = [line.split()[1:3] for line in mounts_file.read_text().splitlines()]
    except OSError:
        return False
    path = str(folder.resolve())
    holding = [
        (point, kind)
        for point, kind in mounts
        if path == point or path.startswith(point.rstrip("/") + "/")
    ]
    return max(holding, default=("", ""), key=lambda mount: len(mount[0]))[1] == "tmpfs"


def _size(count: int) -> str:
    return f"{count / 1e9:,.2f} GB" if count >= 1e8 else f"{count / 1e6:,.1f} MB"


def _parse_line(
    line: str, where: str, problems: Problems, unknown: set[str]
) -> str | Dialog | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        # json's messages for control characters end in " at": the column follows here
        reason = error.msg.removesuffix(" at")
        problems.append(f"{where}: not valid JSON ({reason} at column {error.colno})")
        return None
    except RecursionError:
        problems.append(f"{where}: not a row: JSON nested too deeply (a thousand levels or more)")
        return None
    if not isinstance(record, dict):
        problems.append(f"{where}: expected a JSON object, got {type(record).__name__}")
        return None
    _note_unknown(unknown, set(record) - KNOWN_FIELDS)
    if "\\u" in line:  # a lone surrogate can only come from an escape such as "\ud800"
        field_name = _lone_surrogate_field(record)
        if field_name:
            problems.append(
                f'{where}: "{field_name}" holds a lone surrogate escape (\\ud800 to \\udfff '
                f"without its pair), which is no character: fix how the file was written"
            )
            return None
    if "messages" in record:
        return _conversation_row(record, where, problems, unknown)
    before = len(problems)
    for key in TEXT_FIELDS & set(record):
        if not isinstance(record[key], str):
            problems.append(f'{where}: "{key}" must be a string, got {type(record[key]).__name__}')
    if len(problems) > before:
        return None
    if "text" in record:
        if "prompt" in record or "completion" in record:
            problems.append(f'{where}: has both "text" and "prompt"/"completion"; use one form')
        elif not record["text"].strip():
            problems.append(f'{where}: "text" is empty')
        else:
            return record["text"]
        return None
    for key in ("prompt", "completion"):
        if key not in record:
            problems.append(
                f'{where}: missing "{key}" (rows need "text", "prompt" and "completion", or '
                f'"messages")'
            )
        elif not record[key].strip():
            problems.append(f'{where}: "{key}" is empty')
    if len(problems) > before:
        return None
    turn = Turn(record["prompt"], record["completion"])
    return Dialog((turn,), record.get("system") or None)


def _lone_surrogate_field(record: dict) -> str | None:
    """The first text field (or message content) that UTF-8 cannot encode, if any."""
    values = [(key, record[key]) for key in sorted(TEXT_FIELDS & set(record))]
    messages = record.get("messages")
    if isinstance(messages, list):
        values += [
            (f"messages[{index}].content", message.get("content"))
            for index, message in enumerate(messages)
            if isinstance(message, dict)
        ]
    for name, value in values:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return name
    return None


SHOWN_UNKNOWN_FIELDS = 20  # distinct unknown field names kept for the log


def _note_unknown(unknown: set[str], names: set[str]) -> None:
    """Unknown field names for the log, shortened, and only the first few distinct ones (a
    file with another key on every line must not fill the memory or the log)."""
    for name in names:
        if len(unknown) >= SHOWN_UNKNOWN_FIELDS:
            return
        unknown.add(
            name if len(name) <= QUOTED_CHARACTERS else name[: QUOTED_CHARACTERS - 3] + "..."
        )


def _conversation_row(
    record: dict, where: str, problems: Problems, unknown: set[str]
) -> Dialog | None:
    """{"messages": [...]}: OpenAI's chat fine-tuning format, checked message by message."""
    before = len(problems)
    other = sorted(TEXT_FIELDS & set(record))
    if other:
        problems.append(f'{where}: has "messages" and {", ".join(other)}; use one form')
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        problems.append(f'{where}: "messages" must be a non-empty list of messages')
        return None
    for number, message in enumerate(messages, start=1):
        _check_message(message, f"{where} message {number}", problems, unknown)
    if len(problems) > before:
        return None
    dialog = _dialog(messages, where, problems)
    if dialog is not None and not any(turn.trained for turn in dialog.turns):
        problems.append(f"{where}: no assistant message of weight 1: nothing to train on")
        return None
    return dialog


def _check_message(message: object, where: str, problems: Problems, unknown: set[str]) -> None:
    if not isinstance(message, dict):
        problems.append(f"{where}: expected an object, got {type(message).__name__}")
        return
    role = message.get("role")
    tool_keys = sorted(TOOL_KEYS & set(message))
    if role in ("tool", "function") or tool_keys:
        what = f'role "{role}"' if role in ("tool", "function") else ", ".join(tool_keys)
        problems.append(f"{where}: {what}: tool calling is not supported")
        return
    if role not in ROLES:
        problems.append(f"{where}: unknown role {quoted(role)} (system, user or assistant)")
        return
    _note_unknown(
        unknown, {f"messages[].{key}" for key in set(message) - MESSAGE_FIELDS - TOOL_KEYS}
    )
    content = message.get("content")
    if not isinstance(content, str):
        problems.append(f'{where}: "content" must be a string, got {type(content).__name__}')
    elif not content.strip():
        problems.append(f'{where}: "content" is empty')
    if "weight" in message:
        weight = message["weight"]
        if role != "assistant":
            problems.append(f'{where}: "weight" is for assistant messages, not {role}')
        elif isinstance(weight, bool) or weight not in (0, 1):
            problems.append(f'{where}: "weight" must be 0 or 1, got {quoted(weight)}')


def _dialog(messages: list[dict], where: str, problems: Problems) -> Dialog | None:
    """System first if at all, then user and assistant in turn, ending with assistant."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    offset = 0 if system is None else 1
    turns = messages[offset:]
    for index, message in enumerate(turns):
        wanted = "user" if index % 2 == 0 else "assistant"
        if message["role"] != wanted:
            problems.append(
                f"{where} message {index + offset + 1}: {message['role']} where {wanted} was "
                f"expected (an optional system message, then user and assistant in turn)"
            )
            return None
    if len(turns) % 2:
        problems.append(f"{where}: the conversation must end with an assistant message")
        return None
    pairs = zip(turns[::2], turns[1::2], strict=True)
    return Dialog(
        tuple(Turn(u["content"], a["content"], a.get("weight", 1) == 1) for u, a in pairs),
        system,
    )


def split_validation(
    train: Examples, validation: Examples | None, num_samples: int
) -> tuple[Examples, Examples]:
    """The documented split: the head of validation_data, or else the tail of train_data.

    Held-out rows never exceed a fifth of the training file, so a small file still trains.
    """
    if validation is not None:
        chosen = validation.select(0, min(num_samples, len(validation)))
        log(f"validation: first {len(chosen)} of {len(validation)} rows of validation_data")
        return train, chosen
    rows = len(train)
    held_out = min(num_samples, rows // MAX_VALIDATION_SHARE)
    if held_out < num_samples:
        log(
            f"validation: train_data has {rows} rows, so {held_out} instead of "
            f"{num_samples} are held out (at most a fifth of the rows)"
        )
    if held_out == 0:
        log("validation: no rows to hold out; validation loss is skipped")
        return train, train.select(rows, rows)
    log(
        f"validation: last {held_out} rows of train_data held out, "
        f"{rows - held_out} left to train on"
    )
    return train.select(0, rows - held_out), train.select(rows - held_out, rows)


def check_lengths(examples: Examples, limit: int, reason: str) -> None:
    """Rows longer than `limit` tokens are an error naming each of them; `reason` names the
    limit and what to do, as in "longer than chunk_size 2048: raise chunk_size ..."."""
    problems = Problems()
    for index in np.flatnonzero(examples.lengths > limit):
        problems.append(
            f"{examples.where(index)}: {examples.lengths[index]:,} tokens, longer than {reason}"
        )
    raise_all(problems, f"{len(problems)} row(s) are too long:")


def check_supervised(examples: Examples, name: str) -> None:
    """A set with no token to train on would train (or validate) on nothing: an error."""
    if len(examples) and not examples.supervised.any():
        raise UserInputError(
            f"{name}: none of its {len(examples)} rows has a token to train on (the loss is "
            f"taken on completions and text rows only)"
        )
