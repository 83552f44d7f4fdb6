"""The OpenAI wire format: request bodies checked into a :class:`GenerationRequest`, and the JSON
of responses, stream chunks and errors.

Only this module knows field names of the OpenAI API. The sampling fields are mapped onto
:class:`~gptforge.inference.sampling.SamplingSettings`, whose validation is the one check: its
message, in the request field's name, is the 400. A field that would change the output in a
way the model cannot honour (a forced ``tool_choice``, ``logit_bias``, ...) is
refused with a 400 naming it, never ignored; fields that change nothing here (``user``,
``metadata``, ...) are accepted; unknown fields are ignored with a warning in the server log, as
vLLM does, so that chat front-ends that send their own extras keep working. docs/serving.md lists
every field.

``tools`` (OpenAI's function definitions) are rendered into the prompt by the model's chat
template; a reply's ``<tool_call>`` blocks come back as ``tool_calls`` with ``finish_reason:
"tool_calls"``, and its reasoning (``<think>``) as ``reasoning_content`` (docs/chat_format.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate

from gptforge.errors import GptforgeError
from gptforge.inference.logprobs import TokenLogprob
from gptforge.inference.sampling import SamplingSettings, SettingError, brief_repr, setting_fields
from gptforge.tokenizer.chat_template import tool_call_json

log = logging.getLogger(__name__)

MAX_CHOICES = 16  # n: rows decoded together, each with its own KV cache row
MAX_STOP_STRINGS = 16  # OpenAI allows 4; a few more cost nothing, thousands would slow each step
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, as OpenAI bounds it
MAX_TEXT_LOGPROBS = 5  # text completions' logprobs, as OpenAI bounds it
_warned_fields: set[str] = set()


class ApiError(Exception):
    """An error answered as OpenAI's ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type)
        self.headers = headers or {}  # extra HTTP headers (Allow, WWW-Authenticate)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True)
class GenerationRequest:
    """What a chat or text completion request asks for, checked and with defaults filled in."""

    kind: str  # "chat" (messages) or "text" (prompt)
    messages: list[dict] | None
    prompt: str | None
    model: str | None
    max_tokens: int | None  # None: the endpoint's default, within the context window
    sampling: SamplingSettings  # its max_new_tokens is settled with the prompt (completion.py)
    stop: tuple[str, ...] = ()
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    tools: tuple[dict, ...] = ()  # function definitions offered to the model
    logprobs: int | None = None  # None: no log probabilities; N: with the N most likely tokens
    echo: bool = False  # text completions: the prompt comes back too, with its logprobs


# Fields that change nothing in a reply from this server: accepted without a word.
HARMLESS_FIELDS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls",
                   "safety_identifier", "prompt_cache_key"}
COMMON_FIELDS = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
                 "repetition_penalty", "seed", "stop", "n", "stream", "stream_options",
                 "frequency_penalty", "presence_penalty", "logit_bias", "logprobs"}
CHAT_FIELDS = {"messages", "top_logprobs", "tools", "tool_choice", "functions", "function_call",
               "response_format"}
TEXT_FIELDS = {"prompt", "echo", "suffix", "best_of"}
# The request fields that are sampling settings (top_k and repetition_penalty are vLLM's
# extensions), and the SamplingSettings field each sets. max_completion_tokens is the newer name
# of max_tokens; when both are given, it counts.
SAMPLING_FIELDS = {"max_completion_tokens": "max_new_tokens", "max_tokens": "max_new_tokens",
                   "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                   "repetition_penalty": "repetition_penalty",
                   "frequency_penalty": "frequency_penalty",
                   "presence_penalty": "presence_penalty", "seed": "seed"}
# Where the OpenAI API is stricter than SamplingSettings: (low, high) of the request field.
API_BOUNDS = {"temperature": (0, 2), "max_tokens": (1, None), "max_completion_tokens": (1, None)}


def parse_chat_request(body: dict) -> GenerationRequest:
    """The request of ``POST /v1/chat/completions``; :class:`ApiError` (400) if it is malformed."""
    _warn_unknown(body, COMMON_FIELDS | CHAT_FIELDS)
    if body.get("functions") or body.get("function_call") not in (None, "none", "auto"):
        raise _unsupported("functions", "the legacy functions/function_call are not supported; "
                                        "pass tools")
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise _unsupported("tool_choice", "only \"auto\" and \"none\" are supported (the "
                                          "model decides whether to call a tool)")
    tools = () if body.get("tool_choice") == "none" else _tools(body.get("tools"))
    fmt = body.get("response_format")
    if fmt not in (None, {}) and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise _unsupported("response_format", "only {\"type\": \"text\"} is supported "
                                              "(no JSON mode or schemas)")
    return GenerationRequest(kind="chat", messages=_messages(body), prompt=None, tools=tools,
                             logprobs=_chat_logprobs(body), **_common_fields(body))


def _tools(tools) -> tuple[dict, ...]:
    """The ``tools`` list, each ``{"type": "function", "function": {"name": str, ...}}``."""
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise ApiError(400, "tools must be a list of {\"type\": \"function\", \"function\": "
                            "{...}} objects", param="tools")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" \
                or not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ApiError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": "
                                "{\"name\": str, \"description\", \"parameters\"}}",
                           param=f"tools[{i}]")
    return tuple(tools)


def parse_text_request(body: dict) -> GenerationRequest:
    """The request of ``POST /v1/completions``; :class:`ApiError` (400) if it is malformed."""
    _warn_unknown(body, COMMON_FIELDS | TEXT_FIELDS)
    echo = _boolean(body, "echo")
    if body.get("suffix"):
        raise _unsupported("suffix", "insertion (suffix) is not supported")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one prompt, as some clients (LangChain) send
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string (batches of prompts and token-id prompts "
                            "are not supported)", param="prompt")
    fields = _common_fields(body, min_tokens=0 if echo else 1)  # echo alone scores the prompt
    best_of = body.get("best_of")
    if best_of is not None and best_of != fields["n"]:
        raise _unsupported("best_of", "best_of is not supported (leave it out, or equal to n)")
    logprobs = None if body.get("logprobs") in (None, False) else \
        _integer(body, "logprobs", 0, MAX_TEXT_LOGPROBS, None)
    return GenerationRequest(kind="text", messages=None, prompt=prompt, echo=echo,
                             logprobs=logprobs, **fields)


def _chat_logprobs(body: dict) -> int | None:
    """How many top tokens chat's ``logprobs: true`` asks for (``top_logprobs``), or None."""
    wanted = _boolean(body, "logprobs")
    top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, None)
    if top and not wanted:  # top_logprobs: 0 asks for nothing
        raise ApiError(400, "top_logprobs needs \"logprobs\": true", param="top_logprobs")
    return (top or 0) if wanted else None


def _common_fields(body: dict, min_tokens: int = 1) -> dict:
    if body.get("logit_bias"):
        raise _unsupported("logit_bias", "logit_bias is not supported")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "model must be a string", param="model")
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    include_usage = bool((options or {}).get("include_usage")) and stream
    sampling, max_tokens = _sampling(body, min_tokens)
    return dict(model=model, max_tokens=max_tokens, sampling=sampling, stop=_stop(body),
                n=_integer(body, "n", 1, MAX_CHOICES, 1), stream=stream,
                include_usage=include_usage)


def _sampling(body: dict, min_tokens: int = 1) -> tuple[SamplingSettings, int | None]:
    """The request's sampling settings, and its max_tokens (None when not given); an
    :class:`ApiError` naming the request field when :class:`SamplingSettings` refuses a value."""
    values, params = {}, {}
    for param, name in SAMPLING_FIELDS.items():
        value = body.get(param)
        if value is not None and name not in values:
            if isinstance(value, float) and value.is_integer() and \
                    setting_fields()[name].metadata["kind"] is int:
                value = int(value)  # 100.0 from a JavaScript client
            values[name], params[name] = value, param
    if values.get("top_k") == -1:
        values["top_k"] = 0  # vLLM's "all tokens", as 0 is
    try:
        settings = SamplingSettings(**values)
    except SettingError as err:
        raise ApiError(400, f"{params[err.name]} {err.problem}", param=params[err.name]) from None
    for name, param in params.items():
        low, high = API_BOUNDS.get(param, (None, None))
        if param in ("max_tokens", "max_completion_tokens"):
            low = min_tokens  # 0 with echo: only the prompt is scored
        value = values[name]
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" + (f" and <= {high}" if high is not None else "")
            raise ApiError(400, f"{param} must be {bounds}, got {brief_repr(value)}", param=param)
    return settings, values.get("max_new_tokens")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {\"role\", \"content\"} "
                            "objects", param="messages")
    return [_message(i, m) for i, m in enumerate(messages)]


def _message(i: int, message) -> dict:
    """One message as the chat template takes it: role and string content."""
    if not isinstance(message, dict):
        raise ApiError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
    role = message.get("role")
    if role == "developer":  # OpenAI's newer name for the system message
        role = "system"
    if role not in ("system", "user", "assistant", "tool"):
        raise ApiError(400, f"messages[{i}].role {role!r} is not supported; use system "
                            "(or developer), user, assistant or tool", param=f"messages[{i}].role")
    content = message.get("content")
    if content is None and role == "assistant" and message.get("tool_calls"):
        content = ""
    if isinstance(content, list):  # content parts: text only
        texts = [part.get("text") for part in content if isinstance(part, dict)
                 and part.get("type") == "text"]
        if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, f"messages[{i}].content: only text parts "
                                "({\"type\": \"text\", \"text\": ...}) are supported",
                           param=f"messages[{i}].content")
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                       param=f"messages[{i}].content")
    out = {"role": role, "content": content}
    if role == "assistant":
        out |= _assistant_extras(i, message)
    return out


def _assistant_extras(i: int, message: dict) -> dict:
    """The ``reasoning_content`` and ``tool_calls`` of an assistant message sent back."""
    extras = {}
    reasoning = message.get("reasoning_content", message.get("reasoning"))
    if reasoning:
        if not isinstance(reasoning, str):
            raise ApiError(400, f"messages[{i}].reasoning_content must be a string",
                           param=f"messages[{i}].reasoning_content")
        extras["reasoning"] = reasoning
    calls = message.get("tool_calls")
    if calls:
        try:
            for call in calls:
                tool_call_json(call)
        except (GptforgeError, TypeError) as err:
            raise ApiError(400, f"messages[{i}].tool_calls: {err}",
                           param=f"messages[{i}].tool_calls") from None
        extras["tool_calls"] = calls
    return extras


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops)
            or len(stops) > MAX_STOP_STRINGS):
        raise ApiError(400, f"stop must be a non-empty string or a list of at most "
                            f"{MAX_STOP_STRINGS} of them", param="stop")
    return tuple(stops)


def _integer(body: dict, name: str, low: int, high: int | None, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 100.0 from a JavaScript client
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer, got {brief_repr(value)}", param=name)
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" + (f" and <= {high}" if high is not None else "")
        raise ApiError(400, f"{name} must be {bounds}, got {brief_repr(value)}", param=name)
    return value


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {value!r}", param=name)
    return value


def _unsupported(name: str, message: str) -> ApiError:
    return ApiError(400, message, param=name, code="unsupported_value")


def _warn_unknown(body: dict, known: set[str]) -> None:
    for name in sorted(set(body) - known - HARMLESS_FIELDS - _warned_fields):
        _warned_fields.add(name)
        log.warning("ignoring the request field %r, which this server does not know (said once)",
                    name)


def model_object(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "gptforge"}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response_body(kind: str, head: dict, texts: list[str], reasons: list[str],
                  usage_: dict, reasonings: list[str] | None = None,
                  tool_calls: list[list[dict]] | None = None,
                  logprobs: list[dict | None] | None = None) -> dict:
    """The whole (non-streamed) answer; ``head``: id, created and model; ``reasonings`` and
    ``tool_calls`` of each chat choice, where the model produced them; ``logprobs``: each
    choice's, from :func:`logprobs_body`."""
    logprobs = logprobs or [None] * len(texts)
    if kind == "chat":
        reasonings = reasonings or [""] * len(texts)
        tool_calls = tool_calls or [[] for _ in texts]
        choices = [{"index": i, "message": _reply_message(text, reasonings[i], tool_calls[i]),
                    "logprobs": logprobs[i], "finish_reason": reason}
                   for i, (text, reason) in enumerate(zip(texts, reasons))]
        return {**_opening(head, "chat.completion"), "choices": choices, "usage": usage_}
    choices = [{"index": i, "text": text, "logprobs": lp, "finish_reason": reason}
               for i, (text, reason, lp) in enumerate(zip(texts, reasons, logprobs))]
    return {**_opening(head, "text_completion"), "choices": choices, "usage": usage_}


def _reply_message(text: str, reasoning: str, tool_calls: list[dict]) -> dict:
    message = {"role": "assistant", "content": text}
    if reasoning:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def chunk_body(kind: str, head: dict, index: int, *, text: str | None = None,
               role: bool = False, finish_reason: str | None = None,
               include_usage: bool = False, reasoning: str | None = None,
               tool_calls: list[dict] | None = None, logprobs: dict | None = None) -> dict:
    """One streamed piece of choice ``index``: its role (chat, first), text (with the
    ``logprobs`` of its tokens), reasoning (``reasoning_content``), tool calls (each whole, with
    its ``index``), or finish reason."""
    if kind == "chat":
        delta: dict = {"role": "assistant", "content": ""} if role else {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if text is not None:
            delta["content"] = text
        if tool_calls:
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(tool_calls)]
        choice = {"index": index, "delta": delta, "logprobs": logprobs,
                  "finish_reason": finish_reason}
        body = {**_opening(head, "chat.completion.chunk"), "choices": [choice]}
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs,
                  "finish_reason": finish_reason}
        body = {**_opening(head, "text_completion"), "choices": [choice]}
    if include_usage:  # every chunk but the last carries "usage": null (OpenAI's convention)
        body["usage"] = None
    return body


def usage_chunk_body(kind: str, head: dict, usage_: dict) -> dict:
    """The last chunk with ``stream_options.include_usage``: no choices, the request's usage."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {**_opening(head, obj), "choices": [], "usage": usage_}


def _opening(head: dict, obj: str) -> dict:
    """id, object, created, model: the fields every response starts with, in OpenAI's order."""
    return {"id": head["id"], "object": obj, "created": head["created"], "model": head["model"]}


def logprobs_body(kind: str, entries: Sequence[TokenLogprob], token_text: Callable[[int], str],
                  offset: int = 0) -> dict:
    """A choice's ``logprobs`` object for tokens ``entries``: chat's ``{"content": [...]}``, or
    text completions' parallel lists, ``text_offset`` counted in characters from ``offset``."""
    if kind == "chat":
        return {"content": [{**_token_json(e.token, e.logprob, token_text),
                             "top_logprobs": [_token_json(t, lp, token_text) for t, lp in e.top]}
                            for e in entries], "refusal": None}
    tokens = [token_text(e.token) for e in entries]
    offsets = list(accumulate((len(t) for t in tokens[:-1]), initial=offset))[:len(tokens)]
    # OpenAI's legacy top_logprobs also holds the chosen token; the first prompt token has none.
    tops = [None if e.logprob is None else
            {**{token_text(t): lp for t, lp in e.top}, tokens[i]: e.logprob}
            for i, e in enumerate(entries)]
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": tops, "text_offset": offsets}


def _token_json(token: int, logprob: float, token_text: Callable[[int], str]) -> dict:
    text = token_text(token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
