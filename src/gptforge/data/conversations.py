"""Reading fine-tuning data: conversations (for SFT) and preference pairs (for DPO).

Files are ``.jsonl`` (one JSON record per line; blank lines skipped) or ``.json`` (one array of
records). The common public layouts are recognised record by record, so files can be mixed:

- OpenAI style: ``{"messages": [{"role": "user", "content": "..."}, ...]}``
- ShareGPT: ``{"conversations": [{"from": "human" | "gpt" | "system", "value": "..."}, ...]}``;
  MiniMind writes ``{"conversations": [{"role": ..., "content": ...}]}``, also accepted
- a single exchange: ``{"prompt": "...", "response": "..."}``, optionally with ``"system"``
- preferences: ``{"prompt": ..., "chosen": ..., "rejected": ...}``, each a string or a message
  list; a string prompt is one user message, a string chosen/rejected one assistant message; or
  two whole conversations ``{"chosen": [...], "rejected": [...]}`` whose shared beginning is the
  prompt (they must differ only in their last assistant turn)

An assistant message may hold ``reasoning`` (or ``reasoning_content``, as OpenAI-compatible servers
call it) and ``tool_calls`` in OpenAI's shape (``[{"type": "function", "function": {"name": ...,
"arguments": "JSON string"}}]``); ``tool`` messages hold tool results (``tool_call_id`` optional);
a record's ``tools`` (function definitions) go into its system message.

Everything comes out in one shape, lists of ``{"role", "content"}`` messages with roles from
:data:`~gptforge.tokenizer.chat_template.MESSAGE_ROLES`. A record that cannot be used stops the run
with a :class:`GptforgeError` naming where it is (``path:line`` in a .jsonl file, ``path[index]`` in
a .json array, index from 0) and what is wrong with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from gptforge.data.sources import json_value, jsonl_records
from gptforge.errors import GptforgeError
from gptforge.tokenizer.base import surrogate_problem
from gptforge.tokenizer.chat_template import MESSAGE_ROLES, with_tools

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool"}
CONVERSATION_FORMATS = ('{"messages": [...]}', '{"conversations": [...]}',
                        '{"prompt": str, "response": str}')


class BadRecord(Exception):
    """Raised while parsing one record; the caller adds where the record is."""


def read_conversations(paths: list[str]) -> list[list[dict]]:
    """Every conversation in ``paths``, each a list of {"role", "content"} messages."""
    conversations = []
    for where, record in read_records(paths):
        try:
            conversations.append(_conversation(record))
        except BadRecord as err:
            raise GptforgeError(f"{where}: {err}") from None
    return conversations


def read_preferences(paths: list[str]) -> list[dict]:
    """Every preference record in ``paths`` as {"prompt", "chosen", "rejected"} message lists."""
    records = []
    for where, record in read_records(paths):
        try:
            records.append(_preference(record))
        except BadRecord as err:
            raise GptforgeError(f"{where}: {err}") from None
    return records


# ---- files -> raw records ------------------------------------------------------------------

def read_records(paths: list[str]) -> Iterator[tuple[str, object]]:
    """``(where, record)`` for every record of every file, ``where`` as ``path:line``."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for path in map(Path, paths):
        suffix = path.suffix.lower()
        if suffix not in (".jsonl", ".json"):
            raise GptforgeError(f"{path}: expected a .jsonl or .json file of conversations")
        if not path.is_file():
            raise GptforgeError(f"{path}: no such file")
        yield from jsonl_records(path) if suffix == ".jsonl" else _json_records(path)


def _json_records(path: Path) -> Iterator[tuple[str, object]]:
    data = json_value(path)
    if not isinstance(data, list):
        raise GptforgeError(f"{path}: a .json file must hold an array of records, got a "
                            f"{type(data).__name__}; or write one record per line as .jsonl")
    for index, record in enumerate(data):
        yield f"{path}[{index}]", record


# ---- records -> messages -------------------------------------------------------------------

def _conversation(record) -> list[dict]:
    if not isinstance(record, dict):
        raise BadRecord(f"expected a JSON object, got {_json_type(record)}")
    if "messages" in record:
        messages = _message_list(record["messages"], "messages")
    elif "conversations" in record:
        messages = _message_list(record["conversations"], "conversations")
    elif "prompt" in record and "response" in record:
        messages = _single_exchange(record)
    elif {"prompt", "chosen", "rejected"} <= record.keys():
        raise BadRecord("this is a preference record (prompt/chosen/rejected); use it for DPO, "
                        "or give SFT a conversation")
    else:
        raise BadRecord(f"unknown format, keys {sorted(record)}; expected one of "
                        f"{', '.join(CONVERSATION_FORMATS)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant turn to learn from")
    return with_tools(messages, _tool_definitions(record.get("tools")), "\n\n")


def _tool_definitions(tools) -> list[dict] | None:
    """A record's ``tools`` (OpenAI's function definitions), shown in its system message as the
    named templates show a request's tools, so training and serving see the same prompt."""
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and isinstance(t.get("function"), dict) for t in tools):
        raise BadRecord('"tools" must be a list of {"type": "function", "function": {...}}')
    return tools


def _single_exchange(record: dict) -> list[dict]:
    for key in ("system", "prompt", "response"):
        if key in record and not isinstance(record[key], str):
            raise BadRecord(f'"{key}" must be a string, got {_json_type(record[key])}')
        if key in record:
            _check_unicode(record[key], f'"{key}"')
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return messages + [{"role": "user", "content": record["prompt"]},
                       {"role": "assistant", "content": record["response"]}]


def _message_list(items, key: str) -> list[dict]:
    if not isinstance(items, list):
        raise BadRecord(f'"{key}" must be a list of messages, got {_json_type(items)}')
    if not items:
        raise BadRecord(f'empty conversation ("{key}" is [])')
    return [_message(item, f"{key}[{i}]") for i, item in enumerate(items)]


def _message(item, where: str) -> dict:
    """One message in either spelling: {"role", "content"} or ShareGPT's {"from", "value"}."""
    if not isinstance(item, dict):
        raise BadRecord(f"{where} must be an object, got {_json_type(item)}")
    if "from" in item and "role" not in item:  # ShareGPT
        if "value" not in item:
            raise BadRecord(f'{where} has "from" but no "value"')
        speaker, content = item["from"], item["value"]
        role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise BadRecord(f"{where}: speaker {speaker!r} is not allowed "
                            f"(use one of: {', '.join(SHAREGPT_ROLES)})")
    else:
        missing = [k for k in ("role", "content") if k not in item]
        if missing:
            raise BadRecord(f"{where} is missing {' and '.join(repr(k) for k in missing)} "
                            f"(keys seen: {sorted(item)})")
        role, content = item["role"], item["content"]
        if role not in MESSAGE_ROLES:
            raise BadRecord(f"{where}: role {role!r} is not allowed (use one of: "
                            f"{', '.join(MESSAGE_ROLES)})")
    if content is None and item.get("tool_calls"):
        content = ""  # OpenAI writes null content beside tool calls
    if not isinstance(content, str):
        raise BadRecord(f"{where} ({role}): content must be a string, got {_json_type(content)}")
    _check_unicode(content, f"{where} ({role})")
    message = {"role": role, "content": content}
    if role == "assistant":
        message |= _assistant_extras(item, where)
    return message


def _assistant_extras(item: dict, where: str) -> dict:
    """``reasoning`` and ``tool_calls`` of an assistant message, checked."""
    extras = {}
    reasoning = item.get("reasoning", item.get("reasoning_content"))
    if reasoning is not None:
        if not isinstance(reasoning, str):
            raise BadRecord(f"{where}: reasoning must be a string, got {_json_type(reasoning)}")
        _check_unicode(reasoning, f"{where} (reasoning)")
        if reasoning:
            extras["reasoning"] = reasoning
    calls = item.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise BadRecord(f'{where}: "tool_calls" must be a list, got {_json_type(calls)}')
        extras["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{i}]")
                                for i, c in enumerate(calls)]
    return extras


def _tool_call(call, where: str) -> dict:
    """One tool call in OpenAI's shape; ``arguments`` may be given as an object too."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise BadRecord(f'{where} must be {{"type": "function", "function": {{"name": str, '
                        f'"arguments": JSON string}}}}')
    arguments = function.get("arguments", "{}")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    try:
        json.loads(arguments)
    except json.JSONDecodeError as err:
        raise BadRecord(f"{where}: arguments are not valid JSON ({err})") from None
    out = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _check_unicode(text: str, where: str) -> None:
    problem = surrogate_problem(text)
    if problem:
        raise BadRecord(f"{where}: {problem}; fix the \\uXXXX escape")


def _preference(record) -> dict:
    if not isinstance(record, dict):
        raise BadRecord(f"expected a JSON object, got {_json_type(record)}")
    if "prompt" not in record and isinstance(record.get("chosen"), list) \
            and isinstance(record.get("rejected"), list):
        return _two_conversations(record)
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise BadRecord(f"unknown format, keys {sorted(record)}; a preference record needs "
                        f"\"prompt\", \"chosen\" and \"rejected\" (missing: {', '.join(missing)})")
    prompt = _side(record["prompt"], "prompt", "user")
    pair = {}
    for key in ("chosen", "rejected"):
        messages = _side(record[key], key, "assistant")
        # Some datasets (UltraFeedback binarized) repeat the prompt at the start of each answer.
        if messages[:len(prompt)] == prompt and len(messages) > len(prompt):
            messages = messages[len(prompt):]
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRecord(f'"{key}" has no assistant turn to learn from')
        pair[key] = messages
    return {"prompt": prompt, **pair}


def _two_conversations(record: dict) -> dict:
    """``{"chosen": [...], "rejected": [...]}``: the shared beginning is the prompt, the last
    assistant turn of each the answer."""
    chosen = _message_list(record["chosen"], "chosen")
    rejected = _message_list(record["rejected"], "rejected")
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise BadRecord(f'"{key}" must end with the assistant turn it prefers or rejects')
    prompt = chosen[:-1]
    if rejected[:-1] != prompt:
        at = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b),
                  min(len(chosen), len(rejected)) - 1)
        raise BadRecord(f'"chosen" and "rejected" must be the same conversation up to their last '
                        f'assistant turn; they differ at message {at}')
    if chosen[-1] == rejected[-1]:
        raise BadRecord('"chosen" and "rejected" end with the same answer')
    return {"prompt": prompt, "chosen": chosen[-1:], "rejected": rejected[-1:]}


def _side(value, key: str, string_role: str) -> list[dict]:
    """A prompt/chosen/rejected value: a string (one ``string_role`` message) or a message list."""
    if isinstance(value, str):
        _check_unicode(value, f'"{key}"')
        return [{"role": string_role, "content": value}]
    if isinstance(value, list):
        return _message_list(value, key)
    raise BadRecord(f'"{key}" must be a string or a list of messages, got {_json_type(value)}')


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             type(None): "null", int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)
