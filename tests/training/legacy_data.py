"""The data stage as it was before issue 13 (lists of Python ints per token), kept as the
reference that the streaming, array-based stage must match: same rows, same errors with the
same lines, same tokens and labels, same packing. Test code only."""

import bisect
import json
from dataclasses import dataclass
from pathlib import Path

from src.errors import UserInputError, raise_all
from src.log import log
from src.prompt_format import (
    IGNORE_INDEX,
    Dialog,
    Turn,
    encode_texts,
    render_completion,
    render_user_turn,
)


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]


def encode_dialogs(tokenizer, dialogs: list[Dialog]) -> list[TokenizedExample]:
    """Dialogs as Meta's reference encodes them, in one batched tokenizer call per part.

    Each turn is BOS, `[INST] {user} [/INST]`, then, where answered, `{answer} ` and EOS; the
    system prompt is folded into the first user message. Labels cover the answers of the
    trained turns and their EOS, nothing else. The parts are tokenized apart, which gives the
    ids of tokenizing each turn whole: no vocabulary token spans the space before an answer.
    """
    users = [
        render_user_turn(turn.user, dialog.system if number == 0 else None)
        for dialog in dialogs
        for number, turn in enumerate(dialog.turns)
    ]
    answers = [
        render_completion(turn.answer)
        for dialog in dialogs
        for turn in dialog.turns
        if turn.answer is not None
    ]
    user_ids = iter(encode_texts(tokenizer, users))
    answer_ids = iter(encode_texts(tokenizer, answers))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id  # one attribute lookup each
    examples = []
    for dialog in dialogs:
        input_ids: list[int] = []
        labels: list[int] = []
        for turn in dialog.turns:
            prompt = [bos, *next(user_ids)]
            input_ids += prompt
            labels += [IGNORE_INDEX] * len(prompt)
            if turn.answer is not None:
                answer = [*next(answer_ids), eos]
                input_ids += answer
                labels += answer if turn.trained else [IGNORE_INDEX] * len(answer)
        examples.append(TokenizedExample(input_ids, labels))
    return examples


def encode_text_examples(tokenizer, texts: list[str]) -> list[TokenizedExample]:
    """Plain text rows, trained whole: BOS + text + EOS."""
    examples = []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for ids in encode_texts(tokenizer, texts):
        input_ids = [bos, *ids, eos]
        examples.append(TokenizedExample(input_ids, [IGNORE_INDEX, *input_ids[1:]]))
    return examples


TEXT_FIELDS = {"text", "prompt", "completion", "system"}
KNOWN_FIELDS = TEXT_FIELDS | {"messages"}
ROLES = ("system", "user", "assistant")
MESSAGE_FIELDS = {"role", "content", "weight"}
TOOL_KEYS = {"tool_calls", "function_call", "tool_call_id"}
UTF8_BOM = b"\xef\xbb\xbf"  # what some editors write at the start of a UTF-8 file
MAX_VALIDATION_SHARE = 5  # never hold out more than a fifth of the training rows


@dataclass(frozen=True)
class Row:
    """One checked line of a JSONL file: a text, or a dialog (a prompt/completion row is a
    dialog of one turn)."""

    where: str  # "train_data line 17", for messages
    text: str | None = None
    dialog: Dialog | None = None


@dataclass(frozen=True)
class Example:
    """A tokenized row, with where it came from."""

    where: str
    tokens: TokenizedExample

    def __len__(self) -> int:
        return len(self.tokens.input_ids)


@dataclass(frozen=True)
class TrainingData:
    """The tokenized examples of a run: what is trained on and what is validated on."""

    train: list[Example]
    validation: list[Example]


def read_jsonl(path: Path, name: str) -> list[Row]:
    """Read and check every line; raise one UserInputError listing every bad line."""
    data = path.read_bytes().removeprefix(UTF8_BOM)
    if not data.strip():
        raise UserInputError(f"{name} ({path.name}) is empty: it needs one JSON object per line")
    _refuse_json_array(data, name, path)
    rows: list[Row] = []
    problems: list[str] = []
    bad_lines = 0
    unknown: set[str] = set()
    for number, raw in enumerate(data.splitlines(), start=1):
        known = len(problems)
        where = f"{name} line {number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            problems.append(f"{where}: not valid UTF-8 (byte {error.start + 1} of the line)")
            bad_lines += 1
            continue
        if not line.strip():
            continue  # blank lines carry no data
        row = _parse_line(line, where, problems, unknown)
        if row is not None:
            rows.append(row)
        bad_lines += len(problems) > known
    raise_all(
        problems, f"{name} ({path.name}) has {len(problems)} problem(s) in {bad_lines} line(s):"
    )
    if not rows:
        raise UserInputError(f"{name} ({path.name}) holds no rows")
    if unknown:
        log(f"{name}: ignoring unknown field(s) {', '.join(sorted(unknown))}")
    return rows


def _refuse_json_array(data: bytes, name: str, path: Path) -> None:
    """A file that is one JSON array of rows, a common mistake, gets one error that says so.

    Recognised without parsing the whole file (it can be gigabytes): it opens with "[" and
    closes with "]", and is one line or its first line is not a JSON value of its own.
    """
    content = data.strip()
    if not (content.startswith(b"[") and content.endswith(b"]")):
        return
    first_line, newline, _ = content.partition(b"\n")
    if newline:
        try:
            json.loads(first_line)
            return  # JSONL whose rows are arrays: the line-by-line checks say so
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    raise UserInputError(
        f"{name} ({path.name}) is one JSON array, not JSONL: write one JSON object per line, "
        f"without the enclosing [ ] (for example with `jq -c '.[]' {path.name} > data.jsonl`)"
    )


def _parse_line(line: str, where: str, problems: list[str], unknown: set[str]) -> Row | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        problems.append(f"{where}: not valid JSON ({error.msg} at column {error.colno})")
        return None
    if not isinstance(record, dict):
        problems.append(f"{where}: expected a JSON object, got {type(record).__name__}")
        return None
    unknown.update(set(record) - KNOWN_FIELDS)
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
            return Row(where, text=record["text"])
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
    return Row(where, dialog=Dialog((turn,), record.get("system") or None))


def _conversation_row(
    record: dict, where: str, problems: list[str], unknown: set[str]
) -> Row | None:
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
    return None if dialog is None else Row(where, dialog=dialog)


def _check_message(message: object, where: str, problems: list[str], unknown: set[str]) -> None:
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
        problems.append(f"{where}: unknown role {role!r} (system, user or assistant)")
        return
    unknown.update(f"messages[].{key}" for key in set(message) - MESSAGE_FIELDS - TOOL_KEYS)
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
            problems.append(f'{where}: "weight" must be 0 or 1, got {weight!r}')


def _dialog(messages: list[dict], where: str, problems: list[str]) -> Dialog | None:
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


def tokenize_rows(rows: list[Row], tokenizer) -> list[Example]:
    """Tokenize in batched calls (text rows, dialogs), keeping the file order."""
    text_rows = [r for r in rows if r.text is not None]
    chat_rows = [r for r in rows if r.dialog is not None]
    text_examples = encode_text_examples(tokenizer, [r.text or "" for r in text_rows])
    chat_examples = encode_dialogs(tokenizer, [r.dialog for r in chat_rows if r.dialog])
    by_row = {
        id(r): e for r, e in zip(text_rows + chat_rows, text_examples + chat_examples, strict=True)
    }
    return [Example(r.where, by_row[id(r)]) for r in rows]


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
class PackedRow:
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


def build_rows(examples: list[Example], pack: bool, wrap: bool, chunk_size: int) -> list[PackedRow]:
    """Rows for training: one per example, packed best-fit-decreasing, or wrapped.

    Packing without wrap takes examples of at most `chunk_size` tokens (longer ones are a
    user error, raised with their lines by src.training.data.check_lengths before this runs).
    """
    segments = [Segment.of(e.tokens) for e in examples]
    if not pack:
        return [PackedRow((s,)) for s in segments]
    if wrap:
        return _wrap(segments, chunk_size)
    return _best_fit_decreasing(segments, chunk_size)


def _best_fit_decreasing(segments: list[Segment], capacity: int) -> list[PackedRow]:
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
    return [PackedRow(tuple(b)) for b in bins]


def _wrap(segments: list[Segment], chunk_size: int) -> list[PackedRow]:
    """Cut the stream of all examples into rows of exactly chunk_size tokens (but the last).

    A fragment that continues in the next row carries the label of the token that follows
    it, so its last position is still trained: every label of every example is trained once.
    """
    rows: list[PackedRow] = []
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
                rows.append(PackedRow(tuple(current)))
                current, room = [], chunk_size
    if current:
        rows.append(PackedRow(tuple(current)))
    return rows


def optimizer_steps(
    rows: list,
    order: list[int],
    batch_size: int,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
):
    """Each step takes `batch_size` rows in `order`; rank r takes every world_size-th of them.

    Rows are sorted by length inside a step so that the ranks get similar work; the gradient
    of the step is the same whatever the grouping, since the loss is a sum over tokens.
    """
    for start in range(0, len(order), batch_size):
        step_rows = sorted((rows[i] for i in order[start : start + batch_size]), key=len)
        mine = step_rows[rank::world_size]
        yield (
            [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)],
            sum(r.num_targets for r in step_rows),
            sum(len(r) for r in step_rows),
        )


def collate(rows: list) -> tuple[list[int], list[int], list[int], list[int]]:
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
    return input_ids, positions, targets, lengths
