"""The Jinja ``chat_template`` a Hugging Face tokenizer ships, rendered as ``transformers`` does,
with a loss mask that is exact or refused.

The template is run in Jinja's immutable sandbox with ``trim_blocks`` and ``lstrip_blocks``, and
the names ``transformers``' ``apply_chat_template`` gives it (``messages``, ``tools``,
``add_generation_prompt``, ``bos_token``, ``eos_token``, ``raise_exception``, a ``tojson`` that
does not escape HTML), so it renders the same string.

A Jinja template is only text, so which characters the assistant said is found by rendering
prefixes of the conversation: the rendering of the first k messages must be a prefix of the
whole rendering, which cuts it into one stretch per message; an assistant message's learned part
starts where the rendering of the messages before it *with the generation prompt* ends, and runs
to the end of its stretch (trailing whitespace after the end-of-turn marker left out). Inside
each stretch every content (and reasoning, and tool call) must be found verbatim, in order; it is
encoded as content (special-token strings as text, so nobody forges a turn), the rest as markup.
A template for which any of this fails (it reorders or rewrites content, drops a turn's
reasoning, renders a prefix differently) is refused in one line naming it, and SFT checks that the
segment ids equal the ids of the whole rendered text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gptforge.errors import GptforgeError
from gptforge.tokenizer.base import Tokenizer
from gptforge.tokenizer.chat_template import (
    END_TOKEN,
    ChatTemplate,
    Segment,
    check_messages,
    tool_call_json,
)


class TemplateRefused(GptforgeError):
    """A Jinja chat template whose loss mask cannot be made exact."""


class _Generation(Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask blocks) rendered
    as their body: the mask here comes from prefixes, which work with or without them."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise(message):
    raise TemplateRefused(f"the chat template refused the conversation: {message}")


class JinjaTemplate(ChatTemplate):
    """A Hugging Face tokenizer's own chat template (``finetune.chat_template = "jinja"``)."""

    name = "jinja"

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols, _Generation])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        try:
            self.compiled = env.from_string(source)
        except jinja2.TemplateSyntaxError as err:
            raise GptforgeError(f"chat template (jinja), line {err.lineno}: {err.message}; fix "
                                "tokenizer_config.json's chat_template or choose a named "
                                "template") from None
        self.variables = {"bos_token": bos_token, "eos_token": eos_token}

    def render_text(self, messages: list[dict], tools: Sequence[dict] | None = None,
                    add_generation_prompt: bool = False) -> str:
        shown = [_jinja_message(m) for m in messages]
        try:
            return self.compiled.render(messages=shown, tools=list(tools) if tools else None,
                                        add_generation_prompt=add_generation_prompt,
                                        **self.variables)
        except TemplateRefused:
            raise
        except jinja2.TemplateError as err:
            raise TemplateRefused(f"the chat template (jinja) failed: {err}") from None

    def segments(self, messages: list[dict], tools: Sequence[dict] | None = None,
                 add_generation_prompt: bool = False) -> list[Segment]:
        check_messages(messages)
        full = self.render_text(messages, tools, add_generation_prompt)
        bounds = [self._prefix(full, messages[:k], tools, False) for k in range(len(messages))]
        bounds.append(self._prefix(full, messages, tools, False))
        out = [Segment(full[:bounds[0]])]
        for k, message in enumerate(messages):
            out += self._message(full, message, k, bounds[k], bounds[k + 1], tools, messages)
        out.append(Segment(full[bounds[-1]:]))
        return [s for s in out if s.text]

    def _prefix(self, full: str, messages: list[dict], tools, generation: bool) -> int:
        """Length of the rendering of ``messages``, checked to be where ``full`` starts."""
        if not messages and not generation:
            try:
                text = self.render_text(messages, tools)
            except (GptforgeError, TypeError):  # templates that index messages[0]
                return 0
        else:
            text = self.render_text(messages, tools, generation)
        if not full.startswith(text):
            raise self._refusal(f"rendering the first {len(messages)} messages"
                                f"{' with the generation prompt' if generation else ''} does not "
                                "give the start of rendering them all")
        return len(text)

    def _message(self, full: str, message: dict, k: int, start: int, end: int, tools,
                 messages: list[dict]) -> list[Segment]:
        learn = message["role"] == "assistant"
        if learn:
            opened = self._prefix(full, messages[:k], tools, True)
            if not start <= opened <= end:
                raise self._refusal(f"message {k}'s generation prompt is not inside its turn")
            stop = len(full[:end].rstrip())
        else:
            opened, stop = start, end
        out = [Segment(full[start:opened])]
        cursor = opened
        pieces = _pieces(message)
        for i, piece in enumerate(pieces):
            # The last piece is looked for from the end, so a header that happens to hold the
            # same text (a user who writes "user") is not taken for it.
            found = (full.rfind if i == len(pieces) - 1 else full.find)(piece, cursor, stop)
            if found < 0:
                raise self._refusal(f"message {k} ({message['role']}): its text "
                                    f"{piece[:30]!r} is not in the rendering verbatim")
            out += [Segment(full[cursor:found], learn), Segment(piece, learn, content=True)]
            cursor = found + len(piece)
        return out + [Segment(full[cursor:stop], learn), Segment(full[stop:end])]

    def _refusal(self, why: str) -> TemplateRefused:
        return TemplateRefused(f"chat template 'jinja' (the tokenizer's chat_template) cannot "
                               f"give an exact loss mask: {why}; choose finetune.chat_template "
                               "= gptforge, chatml or llama3")

    def check_ids(self, tokenizer: Tokenizer, messages: list[dict], ids: list[int]) -> None:
        """Refuse the template unless ``ids`` are the ids of the whole rendered text (checked
        where no content holds a special-token string, whose ids differ on purpose)."""
        if any(special for m in messages for text in _pieces(m)
               for _, special in tokenizer.split_special(text)):
            return
        if tokenizer.encode(self.render_text(messages)) != ids:
            raise self._refusal("its rendered text encodes to other ids than its parts (a "
                                "token spans a content boundary)")

    def stop_ids(self, tokenizer: Tokenizer) -> list[int]:
        end = [tokenizer.special_tokens[END_TOKEN]] if END_TOKEN in tokenizer.special_tokens \
            else []
        return end + [tokenizer.eos_id]

    def stop_strings(self, tokenizer: Tokenizer) -> tuple[str, ...]:
        return ()


def _pieces(message: dict) -> list[str]:
    """The texts of a message the template must show verbatim, in order."""
    pieces = [message.get("reasoning") or "", message["content"]]
    pieces += [tool_call_json(c) for c in message.get("tool_calls") or []]
    return [p for p in pieces if p]


def _jinja_message(message: dict) -> dict:
    """A message as Hugging Face templates read it (``reasoning_content``, as Qwen3 does)."""
    shown = dict(message)
    if message.get("reasoning"):
        shown["reasoning_content"] = message["reasoning"]
    return shown
