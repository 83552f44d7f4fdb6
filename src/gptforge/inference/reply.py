"""Reading a generated assistant turn: its reasoning, its answer and its tool calls, apart.

Every chat template gptforge writes puts reasoning first, between ``<think>`` and ``</think>``,
and each tool call last, as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (the
convention of Qwen3 and DeepSeek-R1 for reasoning, of Hermes and Qwen for tools). So a reply is
split as it streams: :class:`ReplySplitter` routes each piece of text to the reasoning or the
content, holding back the few characters that may be the start of a marker (a stream never shows
half a ``</think>``), and keeps the tool calls' text until the turn ends, when it parses them into
OpenAI's ``tool_calls`` shape. :func:`parse_reply` is the same on a whole text, so a streamed reply
and an answered one agree. :class:`ChatReply` is the result of ``TextGenerator.chat``: a ``str``
(the content, as before) that also carries ``.reasoning`` and ``.tool_calls``.
"""

from __future__ import annotations

import json
import re
import uuid

from gptforge.tokenizer.chat_template import THINK, TOOL_CALL

_CALL = re.compile(re.escape(TOOL_CALL[0]) + r"(.*?)(?:" + re.escape(TOOL_CALL[1]) + r"|$)",
                   re.DOTALL)


class ChatReply(str):
    """The assistant's answer (the string itself) with its ``reasoning`` ("" if none) and
    ``tool_calls`` (OpenAI's shape, [] if none)."""

    reasoning: str
    tool_calls: list[dict]

    def __new__(cls, content: str, reasoning: str = "", tool_calls: list[dict] | None = None):
        reply = super().__new__(cls, content)
        reply.reasoning, reply.tool_calls = reasoning, list(tool_calls or [])
        return reply

    @property
    def content(self) -> str:
        return str(self)

    def message(self) -> dict:
        """The reply as an assistant message of a conversation."""
        message = {"role": "assistant", "content": str(self)}
        if self.reasoning:
            message["reasoning"] = self.reasoning
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message


class ReplySplitter:
    """Text pieces in, ``(kind, text)`` pieces out, kind ``"reasoning"`` or ``"content"``."""

    def __init__(self, tools: bool = True):
        self.tools = tools  # without tools offered, <tool_call> text stays in the content
        self.state = "start"  # start -> reasoning -> content -> calls
        self.pending = ""  # text not yet routed (a marker may be starting)
        self.calls_text = ""
        self.strip_next = False  # reasoning and the content after it start without blank lines
        self.reasoning = ""
        self.content = ""

    def feed(self, piece: str) -> list[tuple[str, str]]:
        self.pending += piece
        out: list[tuple[str, str]] = []
        while True:
            step = self._step()
            if step is None:
                return out
            if step[1]:
                out.append(step)

    def _step(self) -> tuple[str, str] | None:
        """Route what can be routed now; None when more text is needed."""
        text = self.pending
        if self.state == "start":
            head = text.lstrip()
            if head.startswith(THINK[0]):
                self.state, self.pending = "reasoning", head[len(THINK[0]):]
                self.strip_next = True
                return "reasoning", ""
            if THINK[0].startswith(head):
                return None
            self.state = "content"
            return "content", ""
        if self.state == "calls":
            self.calls_text += text
            self.pending = ""
            return None
        marker = THINK[1] if self.state == "reasoning" else TOOL_CALL[0]
        if self.strip_next:
            text = self.pending = text.lstrip()
            self.strip_next = not text
        if self.state == "content" and not self.tools:
            self.pending = ""
            return self._emit("content", text) if text else None
        found = text.find(marker)
        if found >= 0:
            kind = self.state
            self.pending = text[found + len(marker):]
            if kind == "reasoning":
                self.state, self.strip_next = "content", True
                return self._emit(kind, text[:found].rstrip())
            self.state, self.calls_text = "calls", marker
            return self._emit(kind, text[:found].rstrip())
        keep = _held_back(text, marker)
        if keep == len(text):
            return None
        self.pending = text[len(text) - keep:]
        return self._emit(self.state, text[:len(text) - keep])

    def _emit(self, kind: str, text: str) -> tuple[str, str]:
        if kind == "reasoning":
            self.reasoning += text
        else:
            self.content += text
        return kind, text

    def finish(self) -> tuple[list[tuple[str, str]], list[dict]]:
        """The text held back, and the tool calls; call once, after the last piece."""
        out = []
        if self.pending and self.state in ("start", "content"):
            out.append(self._emit("content", self.pending))
        elif self.pending and self.state == "reasoning":
            out.append(self._emit("reasoning", self.pending.rstrip()))
        elif self.state == "calls":
            self.calls_text += self.pending
        self.pending = ""
        return out, parse_tool_calls(self.calls_text)


def _held_back(text: str, marker: str) -> int:
    """Characters at the end of ``text`` to hold: a possible start of ``marker``, and trailing
    whitespace (which belongs to the layout if a marker follows)."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-k:]):
            return k + len(text[:-k]) - len(text[:-k].rstrip())
    return len(text) - len(text.rstrip())


def parse_tool_calls(text: str) -> list[dict]:
    """OpenAI ``tool_calls`` of every ``<tool_call>{json}</tool_call>`` in ``text`` whose JSON is
    an object with a string ``name``; anything else is not a call and is dropped."""
    calls = []
    for match in _CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            continue
        arguments = call.get("arguments", {})
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"],
                                   "arguments": arguments if isinstance(arguments, str)
                                   else json.dumps(arguments, ensure_ascii=False)}})
    return calls


def parse_reply(text: str) -> ChatReply:
    """A whole reply split as :class:`ReplySplitter` splits it while streaming."""
    splitter = ReplySplitter()
    splitter.feed(text)
    _, calls = splitter.finish()
    return ChatReply(splitter.content, splitter.reasoning, calls)
