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

Generative tasks (``generative.py``) are read here too, as :class:`GenExample` objects:

- ``generate``: ``{"prompt": "2 + 3 =", "answer": "5"}``; ``answer`` may be an array of accepted
  answers (they are also the references of BLEU and chrF);
- ``gsm8k``: GSM8K's published JSONL ``{"question", "answer"}``, the answer a worked solution
  ending in ``#### N``; the prompt is ``"Question: {question}\nAnswer:"`` (lm-evaluation-harness).

Their few-shot examples come from another file of the same layout (GSM8K: ``train.jsonl`` beside
the task file, or the ``train`` split of an ``hf:`` dataset), the first ``shots`` records of it.
Letter-scored exams (MMLU, C-Eval, CMMLU) are read by ``exams.py``; :func:`load_task` reads any
format.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptforge.data.sources import jsonl_records
from gptforge.errors import GptforgeError
from gptforge.eval.exams import EXAMS, read_exam
from gptforge.eval.generative import GenExample, Shot
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
    examples: list[Example] = []
    for where, record in task_records(spec, max_examples):
        examples.append(check_example(convert(record, where)))
    if not examples:
        raise GptforgeError(f"{spec}: holds no examples")
    return examples


def task_records(spec: str, max_records: int | None = None) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` of a ``.jsonl`` task file or an ``hf:`` dataset; records are objects."""
    records = _hf_records(spec) if spec.startswith("hf:") else _jsonl_records(Path(spec))
    for count, (where, record) in enumerate(records):
        if max_records is not None and count >= max_records:
            return
        if not isinstance(record, dict):
            raise GptforgeError(f"{where}: expected a JSON object, got {_type_name(record)}")
        yield where, record


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


# --------------------------------------------------------------------------- generative tasks


def _answers(record: dict, key: str, where: str) -> tuple[str, ...]:
    value = _field(record, key, where)
    answers = [value] if isinstance(value, str) else value
    if not isinstance(answers, list) or not answers or \
            not all(isinstance(a, str) for a in answers):
        raise GptforgeError(f"{where}: '{key}' must be a string or a non-empty array of strings, "
                            f"got {_type_name(value)}")
    return tuple(answers)


def gen_from_generate(record: dict, where: str) -> tuple[GenExample, Shot]:
    prompt, answers = _text(record, "prompt", where), _answers(record, "answer", where)
    return GenExample(prompt, answers, where), Shot(prompt, answers[0])


def gen_from_gsm8k(record: dict, where: str) -> tuple[GenExample, Shot]:
    prompt = f"Question: {_text(record, 'question', where)}\nAnswer:"
    answer = _text(record, "answer", where)
    if "####" not in answer:
        raise GptforgeError(f"{where}: the answer has no '#### N' final answer (GSM8K layout); "
                            "is --task-format right?")
    return GenExample(prompt, (answer,), where), Shot(prompt, answer)


GEN_CONVERTERS = {"generate": gen_from_generate, "gsm8k": gen_from_gsm8k}
TASK_FORMATS = (*CONVERTERS, *EXAMS, *GEN_CONVERTERS)
SHOT_FORMATS = (*EXAMS, *GEN_CONVERTERS)  # the formats that take few-shot examples


def read_generative(spec: str, task_format: str,
                    max_examples: int | None = None) -> list[GenExample]:
    convert = GEN_CONVERTERS[task_format]
    examples = [convert(r, where)[0] for where, r in task_records(spec, max_examples)]
    if not examples:
        raise GptforgeError(f"{spec}: holds no examples")
    return examples


def fewshot_source(spec: str, task_format: str, fewshot_from: str | None) -> str:
    """Where the shots of a generative task come from: ``fewshot_from``, else GSM8K's train
    split beside the task."""
    if fewshot_from:
        return fewshot_from
    if task_format == "gsm8k":
        if spec.startswith("hf:"):
            return spec.partition("@")[0] + "@train"
        beside = Path(spec).with_name("train.jsonl")
        if beside.is_file():
            return str(beside)
        raise GptforgeError(f"{spec}: the few-shot examples come from train.jsonl beside it "
                            "(GSM8K's layout), which is missing; name a file with --fewshot-from")
    raise GptforgeError(f"--shots needs --fewshot-from FILE.jsonl ({task_format} records) to "
                        "take the examples from")


def read_shots(spec: str, task_format: str, shots: int,
               fewshot_from: str | None) -> list[Shot]:
    if not shots:
        return []
    source = fewshot_source(spec, task_format, fewshot_from)
    convert = GEN_CONVERTERS[task_format]
    found = [convert(r, where)[1] for where, r in task_records(source, shots)]
    if len(found) < shots:
        raise GptforgeError(f"{source}: {len(found)} example(s), fewer than --shots {shots}")
    return found


@dataclass(frozen=True)
class Task:
    """A task ready to score: multiple-choice ``examples``, or generative ones with ``shots``."""

    spec: str
    format: str
    examples: list
    shots: list[Shot]  # a generative task's; an exam's shots are in its prompts
    n_shots: int = 0

    @property
    def generative(self) -> bool:
        return self.format in GEN_CONVERTERS


def load_task(spec: str, task_format: str, *, max_examples: int | None = None, shots: int = 0,
              split: str | None = None, fewshot_from: str | None = None) -> Task:
    """Any task: ``CONVERTERS`` formats, exams (``exams.py``) and generative formats."""
    if task_format in GEN_CONVERTERS:
        return Task(spec, task_format, read_generative(spec, task_format, max_examples),
                    read_shots(spec, task_format, shots, fewshot_from), shots)
    if task_format in EXAMS:
        examples = read_exam(task_format, spec, split, shots, _hf_records)[:max_examples]
        if not examples:
            raise GptforgeError(f"{spec}: holds no examples")
        return Task(spec, task_format, [check_example(e) for e in examples], [], shots)
    if shots:
        raise GptforgeError(f"--shots applies to the formats {', '.join(SHOT_FORMATS)}, not "
                            f"to {task_format}")
    return Task(spec, task_format, read_task(spec, task_format, max_examples), [])
