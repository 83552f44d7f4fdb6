"""Splitting a generated turn into reasoning, answer and tool calls, whole and while streaming."""

from __future__ import annotations

import json

import pytest

from gptforge.inference.reply import ChatReply, ReplySplitter, parse_reply
from gptforge.tokenizer.chat_template import CHATML, DEFAULT, LLAMA3

CALL = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TURN = {"role": "assistant", "content": "Let me look.", "reasoning": "Use the tool.",
        "tool_calls": [CALL]}


def generated(template, message) -> str:
    """The text a model trained on ``template`` writes for ``message`` (before the end marker)."""
    learned = "".join(s.text for s in template.segments([message]) if s.learn)
    return learned.removesuffix(template.end)


def streamed(text: str, tools: bool = True) -> tuple[str, str, list[dict]]:
    splitter = ReplySplitter(tools=tools)
    parts = [p for ch in text for p in splitter.feed(ch)]  # one character at a time
    rest, calls = splitter.finish()
    parts += rest
    return ("".join(t for k, t in parts if k == "reasoning"),
            "".join(t for k, t in parts if k == "content"), calls)


@pytest.mark.parametrize("template", [DEFAULT, CHATML, LLAMA3], ids=lambda t: t.name)
def test_each_templates_turn_is_split_back_into_its_parts(template):
    text = generated(template, TURN)
    reply = parse_reply(text)
    assert isinstance(reply, str) and reply == "Let me look." and reply.content == reply
    assert reply.reasoning == "Use the tool."
    [call] = reply.tool_calls
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    reasoning, content, calls = streamed(text)
    assert (reasoning, content) == (reply.reasoning, str(reply))
    assert [c["function"] for c in calls] == [call["function"]]
    assert reply.message()["tool_calls"] == reply.tool_calls


@pytest.mark.parametrize("text, reasoning, content", [
    ("plain answer", "", "plain answer"),
    ("a < b and <thin", "", "a < b and <thin"),
    ("<think>cut off", "cut off", ""),
    ("  <think>\nx\n</think>\n\nanswer  ", "x", "answer  "),
])
def test_replies_without_calls(text, reasoning, content):
    reply = parse_reply(text)
    assert (reply.reasoning, str(reply), reply.tool_calls) == (reasoning, content, [])
    assert streamed(text) == (reasoning, content, [])


def test_tool_call_text_stays_content_when_no_tools_were_offered():
    text = 'ok <tool_call>{"name": "f", "arguments": {}}</tool_call>'
    assert streamed(text, tools=False) == ("", text, [])
    assert parse_reply(text).tool_calls[0]["function"] == {"name": "f", "arguments": "{}"}


def test_chat_reply_stays_a_string():
    reply = ChatReply("hi")
    assert reply == "hi" and reply.reasoning == "" and reply.tool_calls == []
    assert reply.message() == {"role": "assistant", "content": "hi"}
