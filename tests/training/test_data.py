"""Reading and checking JSONL data: every bad line named, the documented validation split."""

import json

import pytest

from src.errors import UserInputError
from src.prompt_format import Dialog, Turn
from src.training.data import Row, check_lengths, read_jsonl, split_validation, tokenize_rows
from tests.helpers import write_jsonl


def read(tmp_path, content: bytes | str) -> list[Row]:
    path = tmp_path / "data.jsonl"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return read_jsonl(path, "train_data")


def test_mixed_formats_blank_lines_and_system(tmp_path):
    rows = read(tmp_path, '{"text": "a"}\n\n{"prompt": "p", "completion": "c", "system": "s"}\n')
    assert rows == [
        Row("train_data line 1", text="a"),
        Row("train_data line 3", dialog=Dialog((Turn("p", "c"),), "s")),
    ]


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    rows = read(tmp_path, b'\xef\xbb\xbf{"text": "a"}\n{"text": "b"}\n')
    assert rows == [Row("train_data line 1", text="a"), Row("train_data line 2", text="b")]


def test_unknown_fields_are_ignored_with_one_notice(tmp_path, capsys):
    read(tmp_path, '{"text": "a", "id": 1}\n{"text": "b", "id": 2, "lang": "en"}\n')
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
def test_bad_input_names_the_line(tmp_path, content, message):
    with pytest.raises(UserInputError) as error:
        read(tmp_path, content)
    assert message in str(error.value)


def test_every_bad_line_is_reported_together(tmp_path):
    lines = ['{"text": "ok"}'] * 16 + ['{"prompt": "p"}', "not json", '{"text": "ok"}']
    with pytest.raises(UserInputError) as error:
        read(tmp_path, "\n".join(lines))
    message = str(error.value)
    assert "2 problem(s) in 2 line(s)" in message
    assert 'line 17: missing "completion"' in message and "line 18: not valid JSON" in message


def rows(n: int) -> list[Row]:
    return [Row(f"line {i + 1}", text=str(i)) for i in range(n)]


def test_validation_is_the_tail_of_train_data():
    train, validation = split_validation(rows(300), None, 50)
    assert train == rows(250) and validation == rows(300)[250:]


def test_validation_never_takes_more_than_a_fifth(capsys):
    train, validation = split_validation(rows(20), None, 50)
    assert (len(train), len(validation)) == (16, 4)
    assert "4 instead of 50 are held out" in capsys.readouterr().out


def test_tiny_file_trains_without_validation(capsys):
    train, validation = split_validation(rows(3), None, 50)
    assert (len(train), len(validation)) == (3, 0)
    assert "validation loss is skipped" in capsys.readouterr().out


def test_validation_data_head_is_used():
    train, validation = split_validation(rows(10), rows(80), 50)
    assert train == rows(10) and validation == rows(80)[:50]
    assert split_validation(rows(10), rows(5), 50)[1] == rows(5)


def test_tokenize_keeps_file_order_and_origin(tokenizer, tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": "p", "completion": "c"}, {"text": "t"}, {"prompt": "q", "completion": "d"}],
    )
    examples = tokenize_rows(read_jsonl(path, "train_data"), tokenizer)
    assert [e.where for e in examples] == [f"train_data line {i}" for i in (1, 2, 3)]
    assert tokenizer.decode(examples[1].tokens.input_ids) == "<s> t</s>"


def test_rows_longer_than_the_context_are_named(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "short"}, {"text": "word " * 100}])
    examples = tokenize_rows(read_jsonl(path, "train_data"), tokenizer)
    with pytest.raises(
        UserInputError,
        match=r"train_data line 2: 103 tokens, longer than the "
        r"model's context window of 64 tokens",
    ):
        check_lengths(examples, 64, "the model's context window of 64 tokens")


def test_a_set_with_nothing_to_train_on_is_refused():
    from src.prompt_format import IGNORE_INDEX, TokenizedExample
    from src.training.data import Example, check_supervised

    prompt_only = Example("line 1", TokenizedExample([1, 5, 6], [IGNORE_INDEX] * 3))
    with pytest.raises(UserInputError, match="validation: none of its 1 rows has a token"):
        check_supervised([prompt_only], "validation")
    trained = Example("line 2", TokenizedExample([1, 5, 6], [IGNORE_INDEX, 5, 6]))
    check_supervised([prompt_only, trained], "validation")


def conversation(*messages: tuple) -> str:
    """A {"messages": ...} line from (role, content) or (role, content, extra fields)."""
    rows = [{"role": m[0], "content": m[1], **(m[2] if len(m) > 2 else {})} for m in messages]
    return json.dumps({"messages": rows})


def test_conversations_mixed_with_the_other_forms(tmp_path):
    rows = read(
        tmp_path,
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
    assert rows[1] == Row(
        "train_data line 2",
        dialog=Dialog(
            (Turn("Hi", "Hello"), Turn("Name?", "Zorb", trained=False), Turn("Again?", "Zorb.")),
            "Be brief.",
        ),
    )


def test_every_bad_conversation_is_named_at_once(tmp_path):
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
        read(tmp_path, "\n".join(bad) + "\n")
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
