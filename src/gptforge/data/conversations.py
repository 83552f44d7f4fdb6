"""Reading fine-tuning data: conversations (for SFT) and preference pairs (for DPO).

Files are ``.jsonl`` (one JSON record per line; blank lines skipped) or ``.json`` (one array of
records). The common public layouts are recognised record by record, so files can be mixed:

- OpenAI style: ``{"messages": [{"role": "user", "content": "..."}, ...]}``
- ShareGPT: ``{"conversations": [{"from": "human" | "gpt" | "system", "value": "..."}, ...]}``;
  MiniMind writes ``{"conversations": [{"role": ..., "content": ...}]}``, also accepted
- a single exchange: ``{"prompt": "...", "response": "..."}``, optionally with ``"system"``
- preferences: ``{"prompt": ..., "chosen": ..., "rejected": ...}``, each a string or a message
  list; a string prompt is one user message, a string chosen/rejected one assistant message

Everything comes out in one shape, lists of ``{"role", "content"}`` messages with roles from
:data:`~gptforge.tokenizer.chat_template.ROLES`. A record that cannot be used stops the run with a
:class:`GptforgeError` naming where it is (``path:line`` in a .jsonl file, ``path[index]`` in a
.json array, index from 0) and what is wrong with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from gptforge.data.sources import json_value, jsonl_records
from gptforge.errors import GptforgeError
from gptforge.tokenizer.base import surrogate_problem
from gptforge.tokenizer.chat_template import ROLES

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
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
    return messages


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
        if role not in ROLES:
            raise BadRecord(f"{where}: role {role!r} is not allowed (use one of: "
                            f"{', '.join(ROLES)})")
    if not isinstance(content, str):
        raise BadRecord(f"{where} ({role}): content must be a string, got {_json_type(content)}")
    _check_unicode(content, f"{where} ({role})")
    return {"role": role, "content": content}


def _check_unicode(text: str, where: str) -> None:
    problem = surrogate_problem(text)
    if problem:
        raise BadRecord(f"{where}: {problem}; fix the \\uXXXX escape")


def _preference(record) -> dict:
    if not isinstance(record, dict):
        raise BadRecord(f"expected a JSON object, got {_json_type(record)}")
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
