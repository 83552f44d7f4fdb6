"""Multiple-choice tasks from files and datasets: records in, :class:`Example` objects out.

The native record (``--task-format mc``), one JSON object per line of a ``.jsonl`` file::

    {"context": "The capital of France is", "choices": [" Paris", " Rome"], "label": 0}

Each choice is appended to the context exactly as written, so the space between them belongs in
the choices. A task may also be a Hugging Face dataset, ``hf:NAME[:CONFIG]@SPLIT`` (the split is
required: scoring a training split by accident would flatter the model).

Named converters read three benchmarks in the field layout they are published in on the Hub (a
local ``.jsonl`` in that layout works too) and build the prompts lm-evaluation-harness builds:

==========  ===============================================  ==================================
format      fields                                           context / choices
==========  ===============================================  ==================================
hellaswag   activity_label, ctx_a, ctx_b, endings, label     ``"{activity_label}: {ctx_a}
            (Rowan/hellaswag; label is a string)             {ctx_b.capitalize()}"`` / ``" " +
                                                             ending``, WikiHow markup removed
arc         question, choices {text, label}, answerKey       ``"Question: {question}\\nAnswer:"``
            (allenai/ai2_arc, ARC-Easy / ARC-Challenge)      / ``" " + text``
piqa        goal, sol1, sol2, label (ybisk/piqa)             ``"Question: {goal}\\nAnswer:"`` /
                                                             ``" " + sol1``, ``" " + sol2``
==========  ===============================================  ==================================

A record without an answer (the test splits of HellaSwag and PIQA have label ``""`` or ``-1``)
is an error that says to evaluate the validation split.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gptforge.data.sources import jsonl_records
from gptforge.errors import GptforgeError
from gptforge.eval.multiple_choice import Example

HF_TASK_SYNTAX = "hf:NAME[:CONFIG]@SPLIT"


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _field(record: dict, key: str, where: str) -> Any:
    if key not in record:
        fields = ", ".join(map(str, record)) or "none"
        raise GptforgeError(f"{where}: no field '{key}' (fields: {fields}); is --task-format "
                            "right for this data?")
    return record[key]


def _text(record: dict, key: str, where: str) -> str:
    value = _field(record, key, where)
    if not isinstance(value, str):
        raise GptforgeError(f"{where}: '{key}' is {_type_name(value)}, not a string")
    return value


def _texts(record: dict, key: str, where: str) -> list[str]:
    value = _field(record, key, where)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise GptforgeError(f"{where}: '{key}' must be an array of strings, got "
                            f"{_type_name(value)}")
    return value


def _label(record: dict, key: str, where: str) -> int:
    """An answer index: a number, or a string of digits (HellaSwag on the Hub)."""
    value = _field(record, key, where)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        if value in ("", None):
            raise _unlabelled(key, value, where)
        raise GptforgeError(f"{where}: '{key}' is {value!r}, not a choice index (0, 1, ...)")
    if value < 0:
        raise _unlabelled(key, value, where)
    return value


def _unlabelled(key: str, value: Any, where: str) -> GptforgeError:
    return GptforgeError(f"{where}: '{key}' is {value!r}, so the example has no answer (test "
                         "splits are often unlabelled); evaluate a validation split")


def from_mc(record: dict, where: str) -> Example:
    return Example(_text(record, "context", where), tuple(_texts(record, "choices", where)),
                   _label(record, "label", where), where)


def _clean_wikihow(text: str) -> str:
    """HellaSwag's WikiHow texts carry markup: ``[title]`` ends a sentence, ``[header]``,
    ``[step]`` and the like are dropped (as lm-evaluation-harness does)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def from_hellaswag(record: dict, where: str) -> Example:
    ctx = _text(record, "ctx_a", where) + " " + _text(record, "ctx_b", where).capitalize()
    context = _clean_wikihow(_text(record, "activity_label", where) + ": " + ctx)
    choices = tuple(" " + _clean_wikihow(e) for e in _texts(record, "endings", where))
    return Example(context, choices, _label(record, "label", where), where)


def from_arc(record: dict, where: str) -> Example:
    choices = _field(record, "choices", where)
    if not isinstance(choices, dict):
        raise GptforgeError(f"{where}: 'choices' is {_type_name(choices)}, not an object with "
                            "'text' and 'label' arrays")
    texts, letters = _texts(choices, "text", where), _texts(choices, "label", where)
    key = _text(record, "answerKey", where)
    if len(texts) != len(letters) or key not in letters:
        raise GptforgeError(f"{where}: answerKey {key!r} is not one of the choices' labels "
                            f"{letters} (or texts and labels differ in number)")
    question = _text(record, "question", where)
    return Example(f"Question: {question}\nAnswer:", tuple(" " + t for t in texts),
                   letters.index(key), where)


def from_piqa(record: dict, where: str) -> Example:
    goal = _text(record, "goal", where)
    solutions = (_text(record, "sol1", where), _text(record, "sol2", where))
    return Example(f"Question: {goal}\nAnswer:", tuple(" " + s for s in solutions),
                   _label(record, "label", where), where)


CONVERTERS: dict[str, Callable[[dict, str], Example]] = {
    "mc": from_mc, "hellaswag": from_hellaswag, "arc": from_arc, "piqa": from_piqa}


def check_example(example: Example) -> Example:
    where, k = example.where, len(example.choices)
    if k < 2:
        raise GptforgeError(f"{where}: {k} choice(s); a multiple-choice example needs at least 2")
    empty = next((i for i, c in enumerate(example.choices) if not c), None)
    if empty is not None:
        raise GptforgeError(f"{where}: choice {empty} is an empty string")
    if not 0 <= example.label < k:
        raise GptforgeError(f"{where}: label {example.label} is out of range for {k} choices "
                            f"(0..{k - 1})")
    return example


def read_task(spec: str, task_format: str = "mc",
              max_examples: int | None = None) -> list[Example]:
    """The examples of a ``.jsonl`` file or an ``hf:`` dataset, converted by ``task_format``."""
    if task_format not in CONVERTERS:
        raise GptforgeError(f"unknown task format '{task_format}' (choose one of: "
                            f"{', '.join(CONVERTERS)})")
    convert = CONVERTERS[task_format]
    records = _hf_records(spec) if spec.startswith("hf:") else _jsonl_records(Path(spec))
    examples: list[Example] = []
    for where, record in records:
        if max_examples is not None and len(examples) >= max_examples:
            break
        if not isinstance(record, dict):
            raise GptforgeError(f"{where}: expected a JSON object, got {_type_name(record)}")
        examples.append(check_example(convert(record, where)))
    if not examples:
        raise GptforgeError(f"{spec}: holds no examples")
    return examples


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    if not path.exists():
        raise GptforgeError(f"no such task file: {path}")
    if path.suffix.lower() != ".jsonl":
        raise GptforgeError(f"{path}: a task file must be JSONL (one record per line, named "
                            f"*.jsonl), or a dataset: {HF_TASK_SYNTAX}")
    yield from jsonl_records(path)


def _hf_records(spec: str) -> Iterator[tuple[str, Any]]:
    from gptforge.data.huggingface import parse_hf_spec

    if "@" not in spec:
        raise GptforgeError(f"{spec}: name the split to evaluate ({HF_TASK_SYNTAX}), e.g. "
                            "hf:Rowan/hellaswag@validation")
    source = parse_hf_spec(spec)
    for index, row in enumerate(source.rows()):  # whole rows: a task needs several columns
        yield f"{spec} row {index}", row
