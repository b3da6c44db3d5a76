"""Reading, checking, splitting and tokenizing the user's JSONL data.

Each line holds one JSON object: {"text": ...}, {"prompt": ..., "completion": ...} with an
optional "system", or a conversation {"messages": [{"role": ..., "content": ...}, ...]}
(OpenAI's chat fine-tuning format); the forms may be mixed in one file. Every problem is
reported with the file and line before any model is loaded.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from src.errors import UserInputError, raise_all
from src.log import log
from src.prompt_format import (
    Dialog,
    TokenizedExample,
    Tokenizer,
    Turn,
    encode_dialogs,
    encode_text_examples,
)

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


def split_validation(
    train_rows: list[Row], validation_rows: list[Row] | None, num_samples: int
) -> tuple[list[Row], list[Row]]:
    """The documented split: the head of validation_data, or else the tail of train_data.

    Held-out rows never exceed a fifth of the training file, so a small file still trains.
    """
    if validation_rows is not None:
        chosen = validation_rows[:num_samples]
        log(f"validation: first {len(chosen)} of {len(validation_rows)} rows of validation_data")
        return train_rows, chosen
    allowed = len(train_rows) // MAX_VALIDATION_SHARE
    held_out = min(num_samples, allowed)
    if held_out < num_samples:
        log(
            f"validation: train_data has {len(train_rows)} rows, so {held_out} instead of "
            f"{num_samples} are held out (at most a fifth of the rows)"
        )
    if held_out == 0:
        log("validation: no rows to hold out; validation loss is skipped")
        return train_rows, []
    log(
        f"validation: last {held_out} rows of train_data held out, "
        f"{len(train_rows) - held_out} left to train on"
    )
    return train_rows[:-held_out], train_rows[-held_out:]


def tokenize_rows(rows: list[Row], tokenizer: Tokenizer) -> list[Example]:
    """Tokenize in batched calls (text rows, dialogs), keeping the file order."""
    text_rows = [r for r in rows if r.text is not None]
    chat_rows = [r for r in rows if r.dialog is not None]
    text_examples = encode_text_examples(tokenizer, [r.text or "" for r in text_rows])
    chat_examples = encode_dialogs(tokenizer, [r.dialog for r in chat_rows if r.dialog])
    by_row = {
        id(r): e for r, e in zip(text_rows + chat_rows, text_examples + chat_examples, strict=True)
    }
    return [Example(r.where, by_row[id(r)]) for r in rows]


def check_lengths(examples: list[Example], limit: int, reason: str) -> None:
    """Rows longer than `limit` tokens are an error naming each of them; `reason` names the
    limit and what to do, as in "longer than chunk_size 2048: raise chunk_size ..."."""
    problems = [
        f"{e.where}: {len(e):,} tokens, longer than {reason}" for e in examples if len(e) > limit
    ]
    raise_all(problems, f"{len(problems)} row(s) are too long:")


def check_supervised(examples: list[Example], name: str) -> None:
    """A set with no token to train on would train (or validate) on nothing: an error."""
    if examples and not any(e.tokens.num_supervised for e in examples):
        raise UserInputError(
            f"{name}: none of its {len(examples)} rows has a token to train on (the loss is "
            f"taken on completions and text rows only)"
        )
