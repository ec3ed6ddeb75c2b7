import gzip
import json

import pytest

from safekeel.data.formats import DatasetError, load_conversations


def write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_chat_jsonl_round_trip(tmp_path):
    path = write(tmp_path, "chat.jsonl", [json.dumps({"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})])
    result = load_conversations(path)
    assert result.format == "chat"
    [conv] = result.conversations
    assert conv.completion == "hello" and conv.last_user == "hi"
    assert conv.to_prompt_completion()["prompt"][0] == {"role": "system", "content": "be brief"}
    assert conv.source == "chat.jsonl:1"


@pytest.mark.parametrize("record,user,answer", [
    ({"prompt": "2+2?", "completion": "4"}, "2+2?", "4"),
    ({"instruction": "Add", "input": "2 and 2", "output": "4"}, "Add\n\n2 and 2", "4"),
    ({"instruction": "Say hi", "input": "", "output": "hi"}, "Say hi", "hi"),
    ({"question": "2+2?", "answer": "#### 4"}, "2+2?", "#### 4"),
])
def test_other_formats_become_one_conversation_type(tmp_path, record, user, answer):
    result = load_conversations(write(tmp_path, "d.jsonl", [json.dumps(record)]))
    [conv] = result.conversations
    assert (conv.last_user, conv.completion) == (user, answer)


def test_alpaca_json_array_reports_item_numbers(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    result = load_conversations(path)
    assert result.format == "alpaca" and len(result.conversations) == 1
    assert result.skipped[0].line == 2 and result.skipped[0].field == "output"
    assert "item 2" in result.summary() and "'output'" in result.summary()


def test_bad_records_are_reported_with_line_and_field_never_dropped_silently(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    lines = [
        good,
        "{not json",
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "q"}]}),
        json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}),
        json.dumps({"prompt": "p", "completion": "c"}),
        good,
    ]
    result = load_conversations(write(tmp_path, "mixed.jsonl", lines))
    assert len(result.conversations) == 2
    skipped = {s.line: s for s in result.skipped}
    assert set(skipped) == {2, 3, 4, 5, 6}
    assert "invalid JSON" in skipped[2].reason
    assert skipped[3].field == "messages[0].role"
    assert "last message must be from the assistant" in skipped[4].reason
    assert skipped[5].field == "messages[0].content"
    assert "file is chat" in skipped[6].reason
    assert result.n_records == 7


def test_strict_mode_raises_naming_file_line_and_field(tmp_path):
    path = write(tmp_path, "bad.jsonl", [json.dumps({"prompt": "p", "completion": "c"}), json.dumps({"prompt": "p", "completion": 5})])
    with pytest.raises(DatasetError) as error:
        load_conversations(path, strict=True)
    message = str(error.value)
    assert "bad.jsonl" in message and "line 2" in message and "'completion'" in message and "must be a string" in message


def test_limits_on_file_size_and_line_length(tmp_path):
    path = write(tmp_path, "big.jsonl", [json.dumps({"prompt": "p" * 500, "completion": "c"}), json.dumps({"prompt": "p", "completion": "c"})])
    with pytest.raises(DatasetError, match="over the limit"):
        load_conversations(path, max_file_bytes=100)
    result = load_conversations(path, max_line_bytes=200)
    assert len(result.conversations) == 1
    assert result.skipped[0].line == 1 and "over the limit of 200" in result.skipped[0].reason


def test_unrecognised_and_empty_files(tmp_path):
    with pytest.raises(DatasetError, match="no valid records.*unrecognised record"):
        load_conversations(write(tmp_path, "x.jsonl", [json.dumps({"text": "hello"})]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DatasetError, match="empty"):
        load_conversations(empty)
    with pytest.raises(DatasetError, match="no such file"):
        load_conversations(tmp_path / "missing.jsonl")


def test_non_utf8_line_is_reported(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"prompt": "p", "completion": "c"}).encode() + b"\n" + b'{"prompt": "caf\xe9", "completion": "c"}\n')
    result = load_conversations(path)
    assert len(result.conversations) == 1 and "not UTF-8" in result.skipped[0].reason


def test_gzip_jsonl_loads_and_a_corrupt_one_names_the_file(tmp_path):
    good = tmp_path / "chat.jsonl.gz"
    good.write_bytes(gzip.compress((json.dumps({"prompt": "2+2?", "completion": "4"}) + "\n" + "not json\n").encode()))
    result = load_conversations(good)
    assert [c.completion for c in result.conversations] == ["4"]
    assert result.skipped[0].line == 2 and "invalid JSON" in result.skipped[0].reason
    corrupt = tmp_path / "broken.jsonl.gz"
    corrupt.write_bytes(gzip.compress(b'{"prompt": "a", "completion": "b"}\n' * 50)[:40])
    with pytest.raises(DatasetError, match="broken.jsonl.gz.*not a readable gzip file"):
        load_conversations(corrupt)


def test_authored_data_meets_the_spec():
    from collections import Counter

    from safekeel.data.safety import HARM_CATEGORIES, load_authored_benign, load_authored_pool

    pool = load_authored_pool()
    assert len(pool) >= 300
    assert len({e.id for e in pool}) == len(pool)
    assert set(Counter(e.category for e in pool)) == set(HARM_CATEGORIES)
    assert min(Counter(e.category for e in pool).values()) >= 20
    assert {e.style for e in pool} == {"brief", "explain"}
    benign = load_authored_benign()
    assert len(benign) >= 150
    assert sum(c.meta["kind"] == "borderline" for c in benign) >= 50
