"""Reading conversation and preference files: every accepted layout, every rejected record."""

from __future__ import annotations

import json

import pytest

from gptforge.data.conversations import read_conversations, read_preferences
from gptforge.errors import GptforgeError

EXCHANGE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_every_conversation_format_loads_and_mixes(tmp_path):
    openai = {"messages": [{"role": "system", "content": "Be kind."}, *EXCHANGE]}
    sharegpt = {"conversations": [{"from": "system", "value": "Be kind."},
                                  {"from": "human", "value": "Hi"},
                                  {"from": "gpt", "value": "Hello!"}]}
    minimind = {"conversations": EXCHANGE}
    single = {"prompt": "Hi", "response": "Hello!", "system": "Be kind."}
    jsonl = write_jsonl(tmp_path / "a.jsonl", [openai, "", sharegpt, minimind])
    array = tmp_path / "b.json"
    array.write_text(json.dumps([single, {"prompt": "Hi", "response": "Hello!"}]))
    conversations = read_conversations([jsonl, str(array)])
    with_system = [{"role": "system", "content": "Be kind."}, *EXCHANGE]
    assert conversations == [with_system, with_system, EXCHANGE, with_system, EXCHANGE]


def test_extra_keys_are_ignored_and_messages_normalised(tmp_path):
    record = {"id": 7, "messages": [{"role": "user", "content": "Hi", "name": "bob"},
                                    {"role": "assistant", "content": "Hello!", "weight": 1}]}
    assert read_conversations([write_jsonl(tmp_path / "a.jsonl", [record])]) == [EXCHANGE]


def test_preference_formats(tmp_path):
    strings = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}
    lists = {"prompt": [{"role": "system", "content": "Be kind."},
                        {"role": "user", "content": "Hi"}],
             "chosen": [{"role": "assistant", "content": "Hello!"}],
             "rejected": [{"role": "assistant", "content": "Go away."}]}
    # UltraFeedback-style: each answer repeats the prompt message first.
    repeated = {"prompt": "Hi", "chosen": EXCHANGE,
                "rejected": [EXCHANGE[0], {"role": "assistant", "content": "Go away."}]}
    records = read_preferences([write_jsonl(tmp_path / "p.jsonl", [strings, lists, repeated])])
    user = [{"role": "user", "content": "Hi"}]
    good, bad = [{"role": "assistant", "content": "Hello!"}], [
        {"role": "assistant", "content": "Go away."}]
    assert records[0] == {"prompt": user, "chosen": good, "rejected": bad}
    assert records[1] == {"prompt": lists["prompt"], "chosen": good, "rejected": bad}
    assert records[2] == {"prompt": user, "chosen": good, "rejected": bad}


BAD_CONVERSATIONS = [
    ('{"messages": [', "invalid JSON"),
    ({"text": "hello", "meta": 1}, "unknown format, keys ['meta', 'text']"),
    ({"messages": [{"content": "Hi"}]}, "missing 'role'"),
    ({"messages": [{"role": "user"}]}, "missing 'content'"),
    ({"messages": [{"role": "robot", "content": "x"}, EXCHANGE[1]]}, "role 'robot' is not allowed"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "speaker 'bot' is not allowed"),
    ({"messages": [{"role": "user", "content": None}, EXCHANGE[1]]}, "content must be a string"),
    ({"messages": []}, "empty conversation"),
    ({"messages": [EXCHANGE[0]]}, "no assistant turn to learn from"),
    ({"prompt": "Hi", "response": 3}, '"response" must be a string'),
    ({"prompt": "Hi", "chosen": "a", "rejected": "b"}, "preference record"),
    ([1, 2], "expected a JSON object"),
    # A JSON \\ud800 escape decodes to a lone surrogate, which no tokenizer can encode.
    ({"messages": [{"role": "user", "content": "a\ud800"}, EXCHANGE[1]]},
     "messages[0] (user): the text holds an unpaired surrogate '\\ud800' at character 1"),
    ({"prompt": "Hi", "response": "\udfff"}, '"response": the text holds an unpaired surrogate'),
]


@pytest.mark.parametrize("record, message", BAD_CONVERSATIONS)
def test_bad_conversation_records_name_file_and_line(tmp_path, record, message):
    good = {"messages": EXCHANGE}
    path = write_jsonl(tmp_path / "data.jsonl", [good, "", record])  # the bad one is line 3
    with pytest.raises(GptforgeError) as err:
        read_conversations([path])
    assert f"{path}:3: " in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("record, message", BAD_CONVERSATIONS[1:])
def test_bad_records_in_a_json_array_name_their_index(tmp_path, record, message):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"messages": EXCHANGE}, record]))
    with pytest.raises(GptforgeError) as err:
        read_conversations([str(path)])
    assert f"{path}[1]: " in str(err.value) and message in str(err.value)


BAD_PREFERENCES = [
    ({"prompt": "Hi", "chosen": "a"}, "missing: rejected"),
    ({"prompt": 5, "chosen": "a", "rejected": "b"}, '"prompt" must be a string or a list'),
    ({"prompt": "Hi", "chosen": [EXCHANGE[0]], "rejected": "b"}, '"chosen" has no assistant turn'),
    ({"prompt": "Hi", "chosen": "a", "rejected": []}, "empty conversation"),
    ({"prompt": "Hi", "chosen": "a", "rejected": [{"role": "bot", "content": "b"}]},
     "role 'bot' is not allowed"),
    ("not json", "invalid JSON"),
    ({"prompt": "Hi", "chosen": "a", "rejected": "b\ud800"},
     '"rejected": the text holds an unpaired surrogate'),
]


@pytest.mark.parametrize("record, message", BAD_PREFERENCES)
def test_bad_preference_records_name_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "Hi", "chosen": "a", "rejected": "b"},
                                                  record])
    with pytest.raises(GptforgeError) as err:
        read_preferences([path])
    assert f"{path}:2: " in str(err.value) and message in str(err.value)


def test_suffixes_in_capitals_are_read_too(tmp_path):
    # As `gptforge prepare` reads them: DATA.JSONL is a .jsonl file.
    write_jsonl(tmp_path / "DATA.JSONL", [{"messages": EXCHANGE}])
    (tmp_path / "MORE.Json").write_text(json.dumps([{"messages": EXCHANGE}]))
    assert read_conversations([str(tmp_path / "DATA.JSONL"), str(tmp_path / "MORE.Json")]) == \
        [EXCHANGE, EXCHANGE]


def test_file_level_problems(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"messages": []},\n{oops}\n]')
    with pytest.raises(GptforgeError, match=r"broken\.json:3: invalid JSON"):
        read_conversations([str(broken)])
    single = tmp_path / "single.json"
    single.write_text(json.dumps({"messages": EXCHANGE}))
    with pytest.raises(GptforgeError, match="must hold an array"):
        read_conversations([str(single)])
    with pytest.raises(GptforgeError, match="expected a .jsonl or .json"):
        read_conversations([str(tmp_path / "data.txt")])
    with pytest.raises(GptforgeError, match="no such file"):
        read_conversations([str(tmp_path / "missing.jsonl")])
    deep = "[" * 100_000 + "]" * 100_000  # more nesting than the JSON parser can take
    (tmp_path / "deep.jsonl").write_text(json.dumps({"messages": EXCHANGE}) + "\n" + deep + "\n")
    with pytest.raises(GptforgeError, match=r"deep\.jsonl:2: invalid JSON \(nested too deeply\)"):
        read_conversations([str(tmp_path / "deep.jsonl")])
    (tmp_path / "deep.json").write_text(deep)
    with pytest.raises(GptforgeError, match=r"deep\.json: invalid JSON \(nested too deeply\)"):
        read_preferences([str(tmp_path / "deep.json")])
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(json.dumps({"messages": EXCHANGE}).encode() + b"\n\xe9\n")
    with pytest.raises(GptforgeError, match=r"latin1\.jsonl:2: not valid UTF-8 \(byte offset"):
        read_conversations([str(latin1)])


CALL = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def test_reasoning_tool_calls_and_tool_results_are_read(tmp_path):
    record = {"tools": [{"type": "function", "function": {"name": "get_weather"}}],
              "messages": [
                  {"role": "user", "content": "Weather?"},
                  {"role": "assistant", "content": None, "reasoning_content": "Ask the tool.",
                   "tool_calls": [{**CALL, "id": "c1"}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                  {"role": "assistant", "reasoning": "It said sunny.", "content": "Sunny.",
                   "tool_calls": [{"type": "function", "function": {
                       "name": "log", "arguments": {"n": 1}}}]}]}
    [messages] = read_conversations([write_jsonl(tmp_path / "t.jsonl", [record])])
    assert messages[0] == {"role": "system", "content": '<tools>\n{"type": "function", '
                           '"function": {"name": "get_weather"}}\n</tools>'}
    assert messages[2] == {"role": "assistant", "content": "", "reasoning": "Ask the tool.",
                           "tool_calls": [{**CALL, "id": "c1"}]}
    assert messages[3] == {"role": "tool", "content": "sunny"}
    assert messages[4]["reasoning"] == "It said sunny."
    assert messages[4]["tool_calls"][0]["function"]["arguments"] == '{"n": 1}'  # object -> JSON


@pytest.mark.parametrize("call, words", [
    ({"type": "function", "function": {"name": "f", "arguments": "{not json"}}, "not valid JSON"),
    ({"type": "function"}, "must be"),
])
def test_bad_tool_calls_name_file_and_line(tmp_path, call, words):
    record = {"messages": [EXCHANGE[0], {**EXCHANGE[1], "tool_calls": [call]}]}
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": EXCHANGE}, record])
    with pytest.raises(GptforgeError) as err:
        read_conversations([path])
    assert str(err.value).startswith(f"{path}:2: messages[1].tool_calls[0]")
    assert words in str(err.value)


def test_two_whole_conversations_make_a_preference(tmp_path):
    prompt = [{"role": "system", "content": "Be kind."}, *EXCHANGE,
              {"role": "user", "content": "Bye"}]
    record = {"chosen": [*prompt, {"role": "assistant", "content": "Goodbye!"}],
              "rejected": [*prompt, {"role": "assistant", "content": "Whatever."}]}
    [pair] = read_preferences([write_jsonl(tmp_path / "p.jsonl", [record])])
    assert pair == {"prompt": prompt, "chosen": [{"role": "assistant", "content": "Goodbye!"}],
                    "rejected": [{"role": "assistant", "content": "Whatever."}]}


@pytest.mark.parametrize("rejected, words", [
    ([{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Go."}],
     "differ at message 0"),
    ([*EXCHANGE, {"role": "user", "content": "more"}], "must end with the assistant turn"),
    (EXCHANGE, "the same answer"),
])
def test_two_conversations_that_do_not_share_a_prefix_are_refused(tmp_path, rejected, words):
    path = write_jsonl(tmp_path / "p.jsonl", ["", {"chosen": EXCHANGE, "rejected": rejected}])
    with pytest.raises(GptforgeError) as err:
        read_preferences([path])
    assert str(err.value).startswith(f"{path}:2: ") and words in str(err.value)
