"""Chat templates: how a conversation becomes one sequence of token ids, and what to learn.

A chat model is still a next-token predictor; the template is the convention that tells it who is
speaking. gptforge's own template (the default, ``"gptforge"``) writes every turn as its role's
special token, the content, and ``<|end|>``::

    <|system|>You are terse.<|end|><|user|>2+2?<|end|><|assistant|>4<|end|>

Other models were trained with other conventions, so a template is chosen by name
(:data:`TEMPLATES`): ``"chatml"`` (``<|im_start|>role\\ncontent<|im_end|>\\n``, Qwen) and
``"llama3"`` (``<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>``); the Jinja
``chat_template`` a Hugging Face tokenizer ships is rendered by ``jinja_template.py``.

Every template renders a conversation as a list of :class:`Segment`: *markup* the template writes
(encoded with the tokenizer's special tokens recognised, so ``<|im_start|>`` is one id where the
tokenizer has it and plain text where it does not) and *content* people wrote, encoded by
:func:`encode_contents`, which turns a special-token string written in content
(``"<|assistant|>"``) into ordinary text tokens, so nobody can forge a turn in any template.

Assistant turns may carry ``reasoning`` (rendered between ``<think>`` and ``</think>``) and
``tool_calls`` (each ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``); ``tool`` messages
carry tool results (rendered inside ``<tool_response>`` in a user turn). Fine-tuning learns only
what the assistant produces: each segment says whether it is learned, and the mask is True on the
assistant's reasoning, content, tool calls, their markers and the end-of-turn marker (so the model
learns to stop), False on role headers, system, user and tool turns. docs/chat_format.md shows each
template.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from gptforge.errors import GptforgeError
from gptforge.tokenizer.base import Tokenizer

ROLES = ("system", "user", "assistant")  # the roles with a gptforge special token
MESSAGE_ROLES = (*ROLES, "tool")
END_TOKEN = "<|end|>"
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
THINK = ("<think>", "</think>")
TOOL_CALL = ("<tool_call>", "</tool_call>")
TOOL_RESPONSE = ("<tool_response>", "</tool_response>")


class ChatFormatError(GptforgeError, ValueError):
    """A message list that does not follow the chat format (bad role, non-string content)."""


# ---- messages ------------------------------------------------------------------------------

def check_messages(messages: list[dict]) -> None:
    """Raise :class:`ChatFormatError` unless ``messages`` is a list of {"role", "content"} dicts
    with a role from :data:`MESSAGE_ROLES` and string content; an assistant message may add a
    string ``reasoning`` and a ``tool_calls`` list (see :func:`tool_call_json`)."""
    if not isinstance(messages, list):
        raise ChatFormatError(f"messages must be a list of {{'role', 'content'}} dicts, "
                              f"got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ChatFormatError(f"message {i} must be a dict with 'role' and 'content', "
                                  f"got {_preview(message)}")
        if message["role"] not in MESSAGE_ROLES:
            raise ChatFormatError(f"message {i} has role {message['role']!r}; "
                                  f"allowed roles: {', '.join(MESSAGE_ROLES)}")
        if not isinstance(message["content"], str):
            raise ChatFormatError(f"message {i} ({message['role']}) content must be a string, "
                                  f"got {type(message['content']).__name__}")
        if not isinstance(message.get("reasoning") or "", str):
            raise ChatFormatError(f"message {i}: reasoning must be a string")
        for call in message.get("tool_calls") or []:
            tool_call_json(call)


def tool_call_json(call: dict) -> str:
    """``{"name": ..., "arguments": ...}`` of an OpenAI-shaped tool call, the arguments (a JSON
    string) written as given, as Qwen's and Hermes' templates do."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
            or not isinstance(function.get("arguments"), str):
        raise ChatFormatError(f"a tool call must be {{\"type\": \"function\", \"function\": "
                              f"{{\"name\": str, \"arguments\": JSON string}}}}, got "
                              f"{_preview(call)}")
    return '{"name": ' + json.dumps(function["name"], ensure_ascii=False) + \
        ', "arguments": ' + function["arguments"] + "}"


def tools_block(tools: Sequence[dict]) -> str:
    """The tool definitions as the templates show them: one JSON object per line in <tools>."""
    return "<tools>\n" + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools) + \
        "\n</tools>"


# ---- segments and their encoding -------------------------------------------------------------

@dataclass(frozen=True)
class Segment:
    """A run of rendered text: ``content`` (encoded with special-token strings as plain text) or
    markup; ``learn``: part of what the assistant produces; ``token``: a gptforge role name
    (``"<|user|>"``) whose id the tokenizer's role map gives, whatever text it decodes to."""

    text: str
    learn: bool = False
    content: bool = False
    token: str | None = None


def encode_contents(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each message content, with special-token strings encoded as plain text.

    ``Tokenizer.encode`` maps a literal ``"<|user|>"`` to the control id, which would let anyone
    who writes chat content forge turns. Here each such string is cut after its first character
    and both parts are encoded separately: neither part is a special token, so every backend gives
    ordinary text ids that still decode to the same string. (The char backend can only do this if
    ``<``, ``|`` and the letters were in its training text; otherwise it raises its usual
    unknown-character error.) All pieces go to the backend in one ``encode_batch`` call.
    """
    pieces: list[str] = []
    owners: list[int] = []
    for i, text in enumerate(texts):
        for piece, special in tokenizer.split_special(text):
            parts = (piece[:1], piece[1:]) if special else (piece,)
            pieces += parts
            owners += [i] * len(parts)
    ids: list[list[int]] = [[] for _ in texts]
    for owner, piece_ids in zip(owners, tokenizer.encode_batch(pieces), strict=True):
        ids[owner] += piece_ids
    return ids


def encode_content(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of one message content; see :func:`encode_contents`."""
    return encode_contents(tokenizer, [text])[0]


def encode_segments(tokenizer: Tokenizer, renders: list[list[Segment]]
                    ) -> list[tuple[list[int], list[bool]]]:
    """(ids, loss mask) of each rendered conversation, all contents in one batched call."""
    flat = [s for segments in renders for s in segments]
    contents = iter(encode_contents(tokenizer, [s.text for s in flat if s.content]))
    markup_texts = sorted({s.text for s in flat if not s.content and s.token is None and s.text})
    markup = dict(zip(markup_texts, tokenizer.encode_batch(markup_texts), strict=True))
    results = []
    for segments in renders:
        ids: list[int] = []
        mask: list[bool] = []
        for s in segments:
            if s.content:
                piece = next(contents)
            elif s.token is not None:
                piece = [tokenizer.special_tokens[s.token]]
            else:
                piece = markup.get(s.text, [])
            ids += piece
            mask += [s.learn] * len(piece)
        results.append((ids, mask))
    return results


# ---- templates -------------------------------------------------------------------------------

class ChatTemplate:
    """A template: ``segments`` renders messages, turn by turn, from the pieces a subclass gives
    (``opening`` of a turn, ``closing``, the layout of tool results, reasoning and calls);
    ``end`` is the marker that closes an assistant turn."""

    name = ""
    end = ""
    tool_role = "user"  # the role whose turn holds a tool result
    reasoning_style = ("<think>\n", "\n</think>\n\n")  # around the reasoning
    call_style = ("\n<tool_call>\n", "\n</tool_call>")  # around each tool call's JSON

    def segments(self, messages: list[dict], tools: Sequence[dict] | None = None,
                 add_generation_prompt: bool = False) -> list[Segment]:
        check_messages(messages)
        out: list[Segment] = []
        for message in with_tools(messages, tools, "\n\n"):
            out += self.turn(message)
        if add_generation_prompt:
            out += self.opening("assistant")
        return out

    def turn(self, message: dict) -> list[Segment]:
        role = message["role"]
        if role == "tool":
            return [*self.opening(self.tool_role), *self.tool_result(message["content"]),
                    *self.closing(False)]
        learn = role == "assistant"
        body = assistant_body(message, self.reasoning_style, self.call_style) if learn \
            else [Segment(message["content"], content=True)]
        return [*self.opening(role), *body, *self.closing(learn)]

    def opening(self, role: str) -> list[Segment]:
        raise NotImplementedError

    def closing(self, learn: bool) -> list[Segment]:
        raise NotImplementedError

    def tool_result(self, content: str) -> list[Segment]:
        raise NotImplementedError

    def render_text(self, messages: list[dict], tools: Sequence[dict] | None = None,
                    add_generation_prompt: bool = False) -> str:
        return "".join(s.text for s in self.segments(messages, tools, add_generation_prompt))

    def stop_ids(self, tokenizer: Tokenizer) -> list[int]:
        """Ids that end an assistant turn: the end marker where it is one token, and EOS."""
        end = single_id(tokenizer, self.end)
        return ([] if end is None else [end]) + [tokenizer.eos_id]

    def stop_strings(self, tokenizer: Tokenizer) -> tuple[str, ...]:
        """The end marker as text, where the tokenizer has no single token for it."""
        return () if single_id(tokenizer, self.end) is not None else (self.end,)


class GptforgeTemplate(ChatTemplate):
    """``<|role|>content<|end|>``, the role markers and ``<|end|>`` single reserved ids."""

    name, end = "gptforge", END_TOKEN
    reasoning_style = THINK
    call_style = TOOL_CALL

    def opening(self, role: str) -> list[Segment]:
        return [Segment(ROLE_TOKENS[role], token=ROLE_TOKENS[role])]

    def closing(self, learn: bool) -> list[Segment]:
        return [Segment(END_TOKEN, learn=learn, token=END_TOKEN)]

    def tool_result(self, content: str) -> list[Segment]:
        return [Segment(TOOL_RESPONSE[0]), Segment(content, content=True),
                Segment(TOOL_RESPONSE[1])]

    def stop_ids(self, tokenizer: Tokenizer) -> list[int]:
        return [tokenizer.special_tokens[END_TOKEN], tokenizer.eos_id]

    def stop_strings(self, tokenizer: Tokenizer) -> tuple[str, ...]:
        return ()


class HeaderTemplate(ChatTemplate):
    """A turn is ``head[0] + role + head[1]``, the content, ``end`` and ``after``: ChatML and
    Llama 3 are two settings of it. :meth:`jinja` writes the same layout for Hugging Face's
    ``apply_chat_template`` (the tests check that both give the same text)."""

    def __init__(self, name: str, head: tuple[str, str], end: str, after: str, tool_role: str,
                 tool_wrap: tuple[str, str]):
        self.name, self.head, self.end, self.after = name, head, end, after
        self.tool_role, self.tool_wrap = tool_role, tool_wrap

    def opening(self, role: str) -> list[Segment]:
        return [Segment(self.head[0] + role + self.head[1])]

    def closing(self, learn: bool) -> list[Segment]:
        return [Segment(self.end, learn=learn), Segment(self.after)]

    def tool_result(self, content: str) -> list[Segment]:
        return [Segment(self.tool_wrap[0]), Segment(content, content=True),
                Segment(self.tool_wrap[1])]

    def jinja(self) -> str:
        """This template in Jinja, reading ``reasoning_content`` (or ``reasoning``),
        ``tool_calls``, ``tool`` messages and ``tools`` as :meth:`segments` does."""
        q = json.dumps  # Jinja string literals (JSON escapes are valid in Jinja strings)
        head = lambda role: f"{q(self.head[0])} + {role} + {q(self.head[1])}"  # noqa: E731
        close = q(self.end + self.after)
        think0, think1 = (q(t) for t in self.reasoning_style)
        call0, call1 = (q(t) for t in self.call_style)
        return (
            "{%- set ns = namespace(tools='') -%}"
            "{%- if tools -%}{%- set ns.tools = '<tools>' -%}"
            "{%- for tool in tools -%}{%- set ns.tools = ns.tools + '\\n' + (tool | tojson) -%}"
            "{%- endfor -%}{%- set ns.tools = ns.tools + '\\n</tools>' -%}"
            "{%- if not messages or messages[0].role != 'system' -%}"
            f"{{{{- {head(q('system'))} + ns.tools + {close} -}}}}"
            "{%- endif -%}{%- endif -%}"
            "{%- for message in messages -%}"
            "{%- if message.role == 'tool' -%}"
            f"{{{{- {head(q(self.tool_role))} + {q(self.tool_wrap[0])} + message.content + "
            f"{q(self.tool_wrap[1])} + {close} -}}}}"
            "{%- elif message.role == 'assistant' -%}"
            f"{{{{- {head(q('assistant'))} -}}}}"
            "{%- set reasoning = message.reasoning_content or message.reasoning -%}"
            f"{{%- if reasoning -%}}{{{{- {think0} + reasoning + {think1} -}}}}{{%- endif -%}}"
            "{{- message.content or '' -}}"
            "{%- for call in message.tool_calls or [] -%}"
            f"{{%- if message.content or not loop.first -%}}{{{{- {call0} -}}}}"
            f"{{%- else -%}}{{{{- {q(self.call_style[0].lstrip())} -}}}}{{%- endif -%}}"
            "{{- '{\"name\": ' + (call.function.name | tojson) + ', \"arguments\": ' + "
            f"call.function.arguments + '}}' + {call1} -}}}}"
            "{%- endfor -%}"
            f"{{{{- {close} -}}}}"
            "{%- else -%}"
            f"{{{{- {head('message.role')} + message.content -}}}}"
            "{%- if loop.first and message.role == 'system' and tools -%}"
            "{{- '\\n\\n' + ns.tools -}}{%- endif -%}"
            f"{{{{- {close} -}}}}"
            "{%- endif -%}{%- endfor -%}"
            f"{{%- if add_generation_prompt -%}}{{{{- {head(q('assistant'))} -}}}}{{%- endif -%}}")


CHATML = HeaderTemplate("chatml", ("<|im_start|>", "\n"), "<|im_end|>", "\n", "user",
                        ("<tool_response>\n", "\n</tool_response>"))
LLAMA3 = HeaderTemplate("llama3", ("<|start_header_id|>", "<|end_header_id|>\n\n"),
                        "<|eot_id|>", "", "ipython", ("", ""))


def single_id(tokenizer: Tokenizer, text: str) -> int | None:
    """The id of ``text`` where the tokenizer has it as one token, else None."""
    try:
        ids = tokenizer.encode(text)
    except GptforgeError:  # a char tokenizer without these characters
        return None
    return ids[0] if len(ids) == 1 else None


def assistant_body(message: dict, think: tuple[str, str], call: tuple[str, str]) -> list[Segment]:
    """Reasoning, content and tool calls of an assistant message, all learned."""
    out: list[Segment] = []
    if message.get("reasoning"):
        out += [Segment(think[0], learn=True), Segment(message["reasoning"], True, True),
                Segment(think[1], learn=True)]
    out.append(Segment(message["content"], True, True))
    for i, tool_call in enumerate(message.get("tool_calls") or []):
        opening = call[0] if (message["content"] or i) else call[0].lstrip("\n")
        out += [Segment(opening, learn=True), Segment(tool_call_json(tool_call), True, True),
                Segment(call[1], learn=True)]
    return out


def with_tools(messages: list[dict], tools: Sequence[dict] | None, separator: str) -> list[dict]:
    """``messages`` with the tool definitions added to the system message (one made if none)."""
    if not tools:
        return messages
    if messages and messages[0]["role"] == "system":
        system = {**messages[0], "content": messages[0]["content"] + separator + tools_block(tools)}
        return [system, *messages[1:]]
    return [{"role": "system", "content": tools_block(tools)}, *messages]


DEFAULT = GptforgeTemplate()
TEMPLATES: dict[str, ChatTemplate] = {"gptforge": DEFAULT, "chatml": CHATML, "llama3": LLAMA3}


def chat_template(name: str, tokenizer: Tokenizer | None = None) -> ChatTemplate:
    """The template called ``name``: one of :data:`TEMPLATES`, or ``"jinja"`` for the tokenizer's
    own ``chat_template`` (see ``jinja_template.py``)."""
    if name in ("", "gptforge"):
        return DEFAULT
    if name in TEMPLATES:
        return TEMPLATES[name]
    if name == "jinja":
        from gptforge.tokenizer.jinja_template import JinjaTemplate

        source = getattr(tokenizer, "chat_template", None)
        if not source:
            raise GptforgeError("chat_template = jinja: the tokenizer ships no chat_template "
                                "(tokenizer_config.json); choose gptforge, chatml or llama3")
        named = getattr(tokenizer, "named_tokens", {})  # bos/eos as its config names them
        return JinjaTemplate(source, named.get("bos") or "", named.get("eos") or "")
    raise GptforgeError(f"chat_template = {name!r}: unknown template (choose one of: "
                        f"{', '.join([*TEMPLATES, 'jinja'])})")


# ---- the functions of the default template (used throughout) ---------------------------------

def render_conversation(tokenizer: Tokenizer, messages: list[dict],
                        template: ChatTemplate = DEFAULT) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation and a loss mask that is True exactly on the tokens the
    assistant produces: each assistant message's reasoning, content, tool calls and the end
    marker that closes it."""
    return encode_segments(tokenizer, [template.segments(messages)])[0]


def render_prompt(tokenizer: Tokenizer, messages: list[dict], template: ChatTemplate = DEFAULT,
                  tools: Sequence[dict] | None = None) -> list[int]:
    """Ids of the conversation so far followed by the opening of an assistant turn, ready for
    generation; generation stops at ``template.stop_ids`` (or its stop strings)."""
    segments = template.segments(messages, tools, add_generation_prompt=True)
    return encode_segments(tokenizer, [segments])[0][0]


def stop_ids(tokenizer: Tokenizer, template: ChatTemplate = DEFAULT) -> list[int]:
    """Ids that end an assistant turn (gptforge's template: ``[<|end|>, <|endoftext|>]``)."""
    return template.stop_ids(tokenizer)


def render_text(messages: list[dict], template: ChatTemplate = DEFAULT) -> str:
    """The rendering as a string, for docs and debugging (content is shown as written)."""
    return template.render_text(messages)


def _preview(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
