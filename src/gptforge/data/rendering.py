"""Turning a structured record (a JSON object, a Parquet or dataset row) into a document's text.

Corpora rarely come as one text field per record. The Chinese poetry collections, for example,
are JSON arrays of ``{"title": ..., "author": ..., "paragraphs": [...]}``: the text a model
should see is the title, the author and the lines of the poem, together. Two ways to say which
text a record holds:

- a *text field* (``--text-field paragraphs``): one field; a string, or an array of strings
  joined with newlines;
- a *template* (``--template "{title}\\n{author}\\n{paragraphs}"``): literal text with
  ``{field}`` slots, in :meth:`str.format` syntax (``{{`` and ``}}`` are literal braces). A slot
  may name a nested field with dots (``{meta.source}``); arrays are joined with newlines, numbers
  written as JSON writes them, and null is empty.

A field the record lacks is an error naming the record (``file:line``) and the field, since a
template that silently renders nothing for one field would train on malformed text.
"""

from __future__ import annotations

import json
import re
import string
from typing import Any

from gptforge.errors import GptforgeError

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
_ESCAPE = re.compile(r"\\([ntr\\])")


def unescape(text: str) -> str:
    r"""``\n``, ``\t``, ``\r`` and ``\\`` in a command-line string as the characters they name.

    A shell passes ``"{title}\n{body}"`` with a backslash and an ``n``; other backslashes are
    kept as they are (``codecs``' ``unicode_escape`` would also mangle non-ASCII text).
    """
    return _ESCAPE.sub(lambda m: _ESCAPES[m.group(1)], text)


class RecordTemplate:
    """A parsed ``--template``: :meth:`render` fills its slots from one record."""

    def __init__(self, text: str):
        self.text = text
        self.parts: list[tuple[str, str | None]] = []  # (literal text, field after it or None)
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as err:
            raise GptforgeError(f"--template {text!r}: {err}; write a literal brace as {{{{ or "
                                "}}") from None
        for literal, field, spec, conversion in parsed:
            if field is not None:
                _check_slot(text, field, spec, conversion)
            self.parts.append((literal, field))
        self.fields = tuple(dict.fromkeys(f for _, f in self.parts if f is not None))
        if not self.fields:
            raise GptforgeError(f"--template {text!r} names no field; write fields in braces, "
                                "e.g. \"{title}\\n{text}\"")

    def render(self, record: Any, where: str) -> str:
        """The text of ``record``; ``where`` (``file:line``) names it in errors."""
        if not isinstance(record, dict):
            raise GptforgeError(f"{where}: --template needs an object with fields "
                                f"{', '.join(self.fields)}, got {json_type(record)}")
        out = []
        for literal, field in self.parts:
            out.append(literal)
            if field is not None:
                out.append(_slot_text(lookup(record, field, where, "--template"), field, where))
        return "".join(out)

    def columns(self, available: list[str]) -> list[str]:
        """The top-level columns of a table that the slots read (``a.b`` reads column ``a``)."""
        return list(dict.fromkeys(f if f in available else f.split(".")[0] for f in self.fields))


def _check_slot(text: str, field: str, spec: str | None, conversion: str | None) -> None:
    if not field or field.isdigit():
        raise GptforgeError(f"--template {text!r}: every slot must name a field, e.g. {{title}}")
    if spec or conversion or "[" in field:
        raise GptforgeError(f"--template {text!r}: slot {{{field}...}} has a format, conversion "
                            "or index; only field names (with dots for nested fields) are "
                            "supported")


def lookup(record: dict, name: str, where: str, option: str) -> Any:
    """``record[name]``, or for ``a.b`` the nested ``record["a"]["b"]`` when no key is ``a.b``."""
    if name in record:
        return record[name]
    value: Any = record
    path: list[str] = []
    for key in name.split("."):
        if not isinstance(value, dict) or key not in value:
            inside = f" in '{'.'.join(path)}' (for '{name}')" if path else ""
            fields = ", ".join(map(str, value)) if isinstance(value, dict) else json_type(value)
            raise GptforgeError(f"{where}: no field '{key}'{inside} (fields: {fields or 'none'});"
                                f" fix {option}")
        value = value[key]
        path.append(key)
    return value


def field_text(value: Any, name: str, where: str) -> str | None:
    """A ``--text-field`` value as text: a string, or an array of strings joined with newlines;
    None for null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise GptforgeError(f"{where}: field '{name}' is an array holding "
                                    f"{json_type(item)} at [{index}]; only arrays of strings "
                                    "are joined into a text (use --template for other values)")
        return "\n".join(value)
    raise GptforgeError(f"{where}: field '{name}' is {json_type(value)}, not a string")


def _slot_text(value: Any, name: str, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "\n".join(_slot_text(item, name, where) for item in value)
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    raise GptforgeError(f"{where}: field '{name}' is {json_type(value)}; name a field inside it "
                        f"in --template, e.g. {{{name}.text}}")


def json_type(value: Any) -> str:
    """How an error message names the JSON type of ``value``."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
