"""Reading and checking JSONL data: every bad line named, the documented validation split."""

import json
from pathlib import Path

import numpy as np
import pytest

from src.errors import UserInputError
from src.prompt_format import Dialog, Turn, encode_dialogs, encode_text_examples
from src.training.data import (
    _content_bounds,
    check_lengths,
    check_supervised,
    prepare_file,
    split_validation,
)
from src.training.examples import Examples


@pytest.fixture
def read(tmp_path, tokenizer):
    """Prepare a file of `content` as train() does: its examples, or its UserInputError."""

    def prepare(content: bytes | str) -> Examples:
        path = tmp_path / "data.jsonl"
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        folder = tmp_path / "prepared"
        folder.mkdir(exist_ok=True)
        return prepare_file(path, "train_data", tokenizer, folder)

    return prepare


def all_tokens(examples: Examples):
    return [examples.tokens(i) for i in range(len(examples))]


def test_mixed_formats_blank_lines_and_system(read, tokenizer):
    rows = read('{"text": "a"}\n\n{"prompt": "p", "completion": "c", "system": "s"}\n')
    chat = encode_dialogs(tokenizer, [Dialog((Turn("p", "c"),), "s")])
    assert all_tokens(rows) == [*encode_text_examples(tokenizer, ["a"]), *chat]
    assert [rows.where(i) for i in range(2)] == ["train_data line 1", "train_data line 3"]


def test_a_utf8_byte_order_mark_is_accepted(read, tokenizer):
    rows = read(b'\xef\xbb\xbf{"text": "a"}\n{"text": "b"}\n')
    assert all_tokens(rows) == encode_text_examples(
        tokenizer, ["a", "b"]
    ) and rows.lines.tolist() == [1, 2]


def test_unknown_fields_are_ignored_with_one_notice(read, capsys):
    read('{"text": "a", "id": 1}\n{"text": "b", "id": 2, "lang": "en"}\n')
    out = capsys.readouterr().out
    assert out.count("ignoring unknown field(s) id, lang") == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "a"}\n{"text": "b"\n', "train_data line 2: not valid JSON"),
        ('{"prompt": "p"}\n', 'train_data line 1: missing "completion"'),
        ('{"completion": "c"}\n', 'train_data line 1: missing "prompt"'),
        ('{"foo": "bar"}\n', 'train_data line 1: missing "prompt"'),
        ('{"text": "a"}\n["text"]\n', "train_data line 2: expected a JSON object, got list"),
        (
            '[{"text": "a"},\n {"text": "b"}]\n',
            "train_data (data.jsonl) is one JSON array, not JSONL: write one JSON object per line",
        ),
        (
            '[{"text": "a"}, {"text": "b"}]',
            "train_data (data.jsonl) is one JSON array, not JSONL",
        ),
        ('{"text": 3}\n', 'train_data line 1: "text" must be a string, got int'),
        ('{"text": "  "}\n', 'train_data line 1: "text" is empty'),
        ('{"prompt": "p", "completion": ""}\n', 'train_data line 1: "completion" is empty'),
        ('{"text": "t", "prompt": "p", "completion": "c"}\n', 'line 1: has both "text" and'),
        (b'{"text": "a"}\n{"text": "\xff\xfe"}\n', "train_data line 2: not valid UTF-8"),
        ("", "train_data (data.jsonl) is empty"),
        ("\n  \n", "train_data (data.jsonl) is empty"),
    ],
)
def test_bad_input_names_the_line(read, content, message):
    with pytest.raises(UserInputError) as error:
        read(content)
    assert message in str(error.value)


def test_every_bad_line_is_reported_together(read):
    lines = ['{"text": "ok"}'] * 16 + ['{"prompt": "p"}', "not json", '{"text": "ok"}']
    with pytest.raises(UserInputError) as error:
        read("\n".join(lines))
    message = str(error.value)
    assert "2 problem(s) in 2 line(s)" in message
    assert 'line 17: missing "completion"' in message and "line 18: not valid JSON" in message


def numbered(n: int) -> Examples:
    """n examples of 3 tokens; example i holds token i + 10 (so a split can be checked)."""
    ids = np.repeat(np.arange(n, dtype=np.int32) + 10, 3)
    offsets = np.arange(0, 3 * n + 1, 3, dtype=np.int64)
    lines = np.arange(1, n + 1, dtype=np.int64)
    return Examples("train_data", ids, np.ones(3 * n, bool), offsets, lines, np.full(n, 2))


def firsts(examples: Examples) -> list[int]:
    return [int(examples.input_ids[o]) - 10 for o in examples.offsets[:-1]]


def test_validation_is_the_tail_of_train_data():
    train, validation = split_validation(numbered(300), None, 50)
    assert firsts(train) == list(range(250)) and firsts(validation) == list(range(250, 300))
    assert validation.where(0) == "train_data line 251"


def test_validation_never_takes_more_than_a_fifth(capsys):
    train, validation = split_validation(numbered(20), None, 50)
    assert (len(train), len(validation)) == (16, 4)
    assert "4 instead of 50 are held out" in capsys.readouterr().out


def test_tiny_file_trains_without_validation(capsys):
    train, validation = split_validation(numbered(3), None, 50)
    assert (len(train), len(validation)) == (3, 0)
    assert "validation loss is skipped" in capsys.readouterr().out


def test_validation_data_head_is_used():
    train, validation = split_validation(numbered(10), numbered(80), 50)
    assert firsts(train) == list(range(10)) and firsts(validation) == list(range(50))
    assert firsts(split_validation(numbered(10), numbered(5), 50)[1]) == list(range(5))


def test_tokenize_keeps_file_order_and_origin(read, tokenizer):
    rows = [{"prompt": "p", "completion": "c"}, {"text": "t"}, {"prompt": "q", "completion": "d"}]
    examples = read("".join(json.dumps(r) + "\n" for r in rows))
    assert [examples.where(i) for i in range(3)] == [f"train_data line {i}" for i in (1, 2, 3)]
    assert tokenizer.decode(examples.tokens(1).input_ids) == "<s> t</s>"


def test_rows_longer_than_the_context_are_named(read):
    examples = read(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": "word " * 100}))
    with pytest.raises(
        UserInputError,
        match=r"train_data line 2: 103 tokens, longer than the "
        r"model's context window of 64 tokens",
    ):
        check_lengths(examples, 64, "the model's context window of 64 tokens")


def test_a_set_with_nothing_to_train_on_is_refused():
    from src.prompt_format import IGNORE_INDEX, TokenizedExample

    prompt_only = TokenizedExample([1, 5, 6], [IGNORE_INDEX] * 3)
    with pytest.raises(UserInputError, match="validation: none of its 1 rows has a token"):
        check_supervised(Examples.from_tokenized([prompt_only]), "validation")
    trained = TokenizedExample([1, 5, 6], [IGNORE_INDEX, 5, 6])
    check_supervised(Examples.from_tokenized([prompt_only, trained]), "validation")


def conversation(*messages: tuple) -> str:
    """A {"messages": ...} line from (role, content) or (role, content, extra fields)."""
    rows = [{"role": m[0], "content": m[1], **(m[2] if len(m) > 2 else {})} for m in messages]
    return json.dumps({"messages": rows})


def test_conversations_mixed_with_the_other_forms(read, tokenizer):
    rows = read(
        '{"text": "a"}\n'
        + conversation(
            ("system", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Hello"),
            ("user", "Name?"),
            ("assistant", "Zorb", {"weight": 0}),
            ("user", "Again?"),
            ("assistant", "Zorb."),
        )
        + "\n",
    )
    expected = Dialog(
        (Turn("Hi", "Hello"), Turn("Name?", "Zorb", trained=False), Turn("Again?", "Zorb.")),
        "Be brief.",
    )
    assert (
        rows.tokens(1) == encode_dialogs(tokenizer, [expected])[0]
        and rows.where(1) == "train_data line 2"
    )


def test_every_bad_conversation_is_named_at_once(read):
    bad = [
        conversation(("user", "a"), ("tool", "b")),
        conversation(("user", "a"), ("assistant", "b", {"tool_calls": []})),
        conversation(("user", "a"), ("narrator", "b")),
        conversation(("assistant", "a"), ("user", "b")),
        conversation(("user", "a"), ("assistant", "b"), ("user", "c")),
        conversation(("user", "a"), ("assistant", "b", {"weight": 0})),
        conversation(("user", 3), ("assistant", "")),
        conversation(("user", "a", {"weight": 1}), ("assistant", "b", {"weight": 0.5})),
        json.dumps({"messages": [{"role": "user", "content": "a"}], "prompt": "p"}),
        json.dumps({"messages": []}),
        conversation(("system", "s"), ("user", "a"), ("system", "t"), ("assistant", "b")),
        conversation(("user", "a"), ("function", "b")),
        conversation(("user", "a"), ("assistant", "b", {"function_call": {}})),
        json.dumps({"messages": "hello"}),
        json.dumps({"messages": ["hello"]}),
        conversation(("user", "a"), ("assistant", "b", {"weight": True})),
    ]
    with pytest.raises(UserInputError) as error:
        read("\n".join(bad) + "\n")
    message = str(error.value)
    for expected in [
        'line 1 message 2: role "tool": tool calling is not supported',
        "line 2 message 2: tool_calls: tool calling is not supported",
        "line 3 message 2: unknown role 'narrator' (system, user or assistant)",
        "line 4 message 1: assistant where user was expected",
        "line 5: the conversation must end with an assistant message",
        "line 6: no assistant message of weight 1: nothing to train on",
        'line 7 message 1: "content" must be a string, got int',
        'line 7 message 2: "content" is empty',
        'line 8 message 1: "weight" is for assistant messages, not user',
        'line 8 message 2: "weight" must be 0 or 1, got 0.5',
        'line 9: has "messages" and prompt; use one form',
        'line 10: "messages" must be a non-empty list of messages',
        "line 11 message 3: system where assistant was expected",
        'line 12 message 2: role "function": tool calling is not supported',
        "line 13 message 2: function_call: tool calling is not supported",
        'line 14: "messages" must be a non-empty list of messages',
        "line 15 message 1: expected an object, got str",
        'line 16 message 2: "weight" must be 0 or 1, got True',
    ]:
        assert expected in message, expected
    assert "18 problem(s) in 16 line(s)" in message


def test_the_system_prompt_of_the_chat_rows_is_counted(tmp_path, tokenizer):
    """None, the one all rows share, or the most frequent with its count; text rows are no
    chat rows, and bad lines are not counted."""
    from src.prompt_format import SystemPromptTally, TrainedSystemPrompt

    def tally(*rows: dict | str) -> TrainedSystemPrompt:
        path = tmp_path / "data.jsonl"
        lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
        path.write_text("".join(line + "\n" for line in lines))
        systems = SystemPromptTally()
        folder = tmp_path / f"prepared{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        prepare_file(path, "train_data", tokenizer, folder, systems)
        return systems.result()

    pair = {"prompt": "p", "completion": "c"}
    terse = {**pair, "system": "Be terse."}
    talk = {"messages": [{"role": "system", "content": "Be kind."}, *pair_messages()]}
    assert tally({"text": "a"}) == TrainedSystemPrompt(None, 0, 0, 0)
    assert tally(pair, pair, {"text": "a"}) == TrainedSystemPrompt(None, 2, 2, 1)
    assert tally(pair, {**pair, "system": ""}) == TrainedSystemPrompt(None, 2, 2, 1)  # "": none
    assert tally(terse, terse) == TrainedSystemPrompt("Be terse.", 2, 2, 1)
    assert tally(talk, terse, talk, pair) == TrainedSystemPrompt("Be kind.", 2, 4, 3)
    assert tally(terse, talk) == TrainedSystemPrompt("Be terse.", 1, 2, 2)  # a tie: the first
    with pytest.raises(UserInputError):
        tally(terse, '{"prompt": "p"}')
    assert TrainedSystemPrompt.from_json(tally(talk, pair).as_json()) == tally(talk, pair)


def pair_messages() -> list[dict]:
    return [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]


def test_a_disk_that_fills_while_the_data_is_written_is_named(tmp_path, tokenizer):
    """/dev/full stands for the full disk: every write fails with ENOSPC."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    data = tmp_path / "facts.jsonl"
    data.write_text('{"prompt": "p", "completion": "c"}\n' * 8)
    folder = tmp_path / "prepared"
    folder.mkdir()
    (folder / "train_data.input_ids").symlink_to("/dev/full")
    with pytest.raises(UserInputError) as error:
        prepare_file(data, "train_data", tokenizer, folder)
    message = str(error.value)
    assert "train_data: the disk ran out of room while its tokenized rows were written" in message
    assert f"to {tmp_path}" in message and "set TMPDIR to a folder with more" in message


def test_content_bounds_never_loops_on_a_file_larger_than_its_size_says():
    """/proc files say size 0 and read bytes (train_data refuses them before this)."""
    import threading

    found = []
    status = Path("/proc/self/status")
    reader = threading.Thread(target=lambda: found.append(_content_bounds(status)), daemon=True)
    reader.start()
    reader.join(timeout=30)
    assert found and found[0][0] == 0 and found[0][1] > 0
