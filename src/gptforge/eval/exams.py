"""Four-option exams scored by answer letter: MMLU, C-Eval and CMMLU, from their published files.

The model is shown the question and the options and scores the four letters as continuations,
as lm-evaluation-harness's ``mmlu``, ``ceval-valid`` and ``cmmlu`` tasks do::

    The following are multiple choice questions (with answers) about abstract algebra.

    {question}
    A. {A}
    B. {B}
    C. {C}
    D. {D}
    Answer:                         choices " A", " B", " C", " D"

(C-Eval and CMMLU: a Chinese header and ``答案：`` instead of ``Answer:``.) With ``shots`` > 0 the
first ``shots`` rows of the subject's dev split, each followed by `` {letter}``, come between the
header and the question, separated by blank lines (lm-evaluation-harness's ``first_n``
sampler). Each (subject, split) file is one subject; every row is one :class:`Example`.

Layouts read (``DIR`` is what ``--task`` names):

=======  ===========================================================  =======================
format   files                                                        columns
=======  ===========================================================  =======================
mmlu     ``DIR[/data]/{test,dev}/{subject}_{split}.csv`` (hendrycks)   question,A,B,C,D,answer
         (no header)
mmlu     ``DIR/{subject or all}/{split}-*.parquet`` or ``.jsonl`` /    question, subject,
         ``.json``, or one such file, or ``hf:cais/mmlu:all@test``     choices, answer (0-3)
         (the Hugging Face ``cais/mmlu`` layout)
ceval    ``DIR/{val,dev,test}/{subject}_{split}.csv``, header          id,question,A,B,C,D,
         (C-Eval's release; test answers are withheld: score val)      answer[,explanation]
cmmlu    ``DIR/{dev,test}/{subject}.csv``, header                      ,Question,A,B,C,D,Answer
=======  ===========================================================  =======================

C-Eval's header names the subject in Chinese when ``subject_mapping.json`` (in C-Eval's
repository) is in ``DIR``; otherwise, as for CMMLU, the file's subject name is used.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptforge.data.sources import decode_utf8, json_value, jsonl_records
from gptforge.errors import GptforgeError
from gptforge.eval.multiple_choice import Example

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Exam:
    name: str
    split: str  # scored by default
    header: str  # {subject} is filled in
    cue: str  # ends the prompt; the letters follow after a space


EXAMS = {
    "mmlu": Exam("mmlu", "test", "The following are multiple choice questions (with answers) "
                 "about {subject}.\n\n", "Answer:"),
    "ceval": Exam("ceval", "val",
                  "以下是中国关于{subject}的单项选择题，请选出其中的正确答案。\n\n", "答案："),
    "cmmlu": Exam("cmmlu", "test",
                  "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n", "答案："),
}


@dataclass(frozen=True)
class Question:
    text: str
    options: tuple[str, str, str, str]
    answer: int  # 0..3
    where: str


def question_text(q: Question, cue: str) -> str:
    options = "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, q.options))
    return f"{q.text.strip()}{options}\n{cue}"


def exam_prompt(exam: Exam, subject: str, question: Question, shots: list[Question]) -> str:
    blocks = [f"{question_text(s, exam.cue)} {LETTERS[s.answer]}\n\n" for s in shots]
    return exam.header.format(subject=subject) + "".join(blocks) + question_text(question, exam.cue)


def to_examples(exam: Exam, subject: str, questions: list[Question],
                shots: list[Question]) -> list[Example]:
    return [Example(exam_prompt(exam, subject, q, shots), tuple(" " + x for x in LETTERS),
                    q.answer, q.where, group=subject) for q in questions]


# --------------------------------------------------------------------------- answers


def letter_index(value: Any, where: str, split: str) -> int:
    """An answer as ``"A"``..``"D"`` or 0..3 (cais/mmlu); an empty one is a withheld answer."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 4:
        return value
    text = str(value).strip() if value is not None else ""
    if text in LETTERS:
        return LETTERS.index(text)
    if text == "":
        raise GptforgeError(f"{where}: no answer (the {split} split withholds its answers, as "
                            "C-Eval's test split does); score a split with answers (--task-split "
                            "val)")
    raise GptforgeError(f"{where}: answer {value!r} is not one of A, B, C, D (or 0-3)")


# --------------------------------------------------------------------------- CSV layouts


# The columns of each CSV layout: (header row or None, index of question, first option, answer).
CSV_COLUMNS = {"mmlu": (None, 0, 1, 5),
               "ceval": (("id", "question", "A", "B", "C", "D", "answer"), 1, 2, 6),
               "cmmlu": (("", "Question", "A", "B", "C", "D", "Answer"), 1, 2, 6)}


def csv_rows(path: Path) -> Iterator[tuple[str, list[str]]]:
    """``(path:line, fields)`` of each non-blank row of a UTF-8 CSV file."""
    try:
        text = decode_utf8(path.read_bytes(), str(path))
    except OSError as err:
        raise GptforgeError(f"{path}: cannot read ({err.strerror})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    line = 1
    try:
        for fields in reader:
            if any(f.strip() for f in fields):
                yield f"{path}:{line}", fields
            line = reader.line_num + 1
    except csv.Error as err:
        raise GptforgeError(f"{path}:{reader.line_num}: bad CSV ({err})") from None


def read_csv_questions(fmt: str, path: Path, split: str) -> list[Question]:
    header, q_col, first, a_col = CSV_COLUMNS[fmt]
    rows = csv_rows(path)
    if header is not None:
        where, names = next(rows, (f"{path}:1", []))
        names = [n.strip() for n in names]
        if tuple(names) == header[:-1]:  # C-Eval's test files have no answer column
            raise GptforgeError(f"{where}: no answer column: the {split} split withholds its "
                                "answers; score a split with answers (--task-split val)")
        if tuple(names[:len(header)]) != header:
            raise GptforgeError(f"{where}: the header is {','.join(names)!r}, expected "
                                f"{','.join(header)!r} ({fmt} layout); is --task-format right?")
    width = a_col + 1
    questions = []
    for where, fields in rows:
        if len(fields) < width:
            raise GptforgeError(f"{where}: {len(fields)} columns, expected {width} "
                                f"({fmt} layout: {_column_names(fmt)}); is --task-format right?")
        options = tuple(fields[first:first + 4])
        questions.append(Question(fields[q_col], options,  # type: ignore[arg-type]
                                  letter_index(fields[a_col], where, split), where))
    return questions


def _column_names(fmt: str) -> str:
    header = CSV_COLUMNS[fmt][0]
    return ",".join(header) if header else "question,A,B,C,D,answer without a header"


def csv_subject_files(fmt: str, root: Path, split: str) -> dict[str, Path]:
    """``{subject: file}`` of one split of a CSV layout."""
    folder = root / split
    if not folder.is_dir():
        have = ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir())) or "none"
        raise GptforgeError(f"{root}: no '{split}' folder (folders: {have}); --task names the "
                            f"folder that holds the {fmt} split folders")
    suffix = "" if fmt == "cmmlu" else f"_{split}"
    files = {}
    for path in sorted(folder.glob(f"*{suffix}.csv")):
        files[path.name[:-len(f"{suffix}.csv")]] = path
    if not files:
        raise GptforgeError(f"{folder}: no *{suffix}.csv files ({fmt} layout)")
    return files


def subject_names(fmt: str, root: Path) -> dict[str, str]:
    """Display names: C-Eval's Chinese names from its subject_mapping.json if present."""
    mapping = root / "subject_mapping.json"
    if fmt != "ceval" or not mapping.is_file():
        return {}
    value = json_value(mapping)
    return {k: v[1] for k, v in value.items() if isinstance(v, list) and len(v) > 1}


def read_csv_exam(fmt: str, root: Path, split: str, shots: int) -> list[Example]:
    if fmt == "mmlu" and (root / "data").is_dir():  # the hendrycks/test archive's top folder
        root = root / "data"
    names = subject_names(fmt, root)
    dev = csv_subject_files(fmt, root, "dev") if shots else {}
    examples = []
    for subject, path in csv_subject_files(fmt, root, split).items():
        shot_rows = []
        if shots:
            if subject not in dev:
                raise GptforgeError(f"{path}: no dev file for subject '{subject}' in "
                                    f"{root / 'dev'}; the {shots}-shot examples come from it")
            shot_rows = take_shots(read_csv_questions(fmt, dev[subject], "dev"), shots,
                                   dev[subject])
        display = names.get(subject, subject.replace("_", " "))
        examples += to_examples(EXAMS[fmt], display, read_csv_questions(fmt, path, split),
                                shot_rows)
    return examples


def take_shots(questions: list[Question], shots: int, source: Any) -> list[Question]:
    if len(questions) < shots:
        raise GptforgeError(f"{source}: {len(questions)} example(s), fewer than --shots {shots}")
    return questions[:shots]


# --------------------------------------------------------------------------- cais/mmlu layout


def record_question(record: Any, where: str) -> tuple[str, Question]:
    """(subject, question) of a cais/mmlu record {question, subject, choices, answer}."""
    if not isinstance(record, dict):
        raise GptforgeError(f"{where}: expected an object with question, subject, choices and "
                            "answer")
    missing = [k for k in ("question", "choices", "answer") if k not in record]
    if missing:
        fields = ", ".join(map(str, record)) or "none"
        raise GptforgeError(f"{where}: no field '{missing[0]}' (fields: {fields}); is "
                            "--task-format right?")
    choices = record["choices"]
    if not isinstance(choices, list) or len(choices) != 4 or \
            not all(isinstance(c, str) for c in choices):
        raise GptforgeError(f"{where}: 'choices' must be an array of 4 strings")
    if not isinstance(record["question"], str):
        raise GptforgeError(f"{where}: 'question' must be a string")
    question = Question(record["question"], tuple(choices),  # type: ignore[arg-type]
                        letter_index(record["answer"], where, "this"), where)
    return str(record.get("subject") or ""), question


def table_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Records of a .jsonl, .json (an array) or .parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from jsonl_records(path)
    elif suffix == ".json":
        value = json_value(path)
        if not isinstance(value, list):
            raise GptforgeError(f"{path}: expected a JSON array of records")
        yield from ((f"{path}[{i}]", r) for i, r in enumerate(value))
    elif suffix == ".parquet":
        yield from parquet_records(path)
    else:
        raise GptforgeError(f"{path}: expected .jsonl, .json or .parquet records")


def parquet_records(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise GptforgeError(f"{path}: not a readable Parquet file "
                            f"({str(err).strip().splitlines()[0]})") from None
    yield from ((f"{path}:row {i}", row) for i, row in enumerate(rows))


def split_files(root: Path, split: str) -> list[Path]:
    """Files of one split in the cais/mmlu layout: ``{split}-*.parquet`` or ``{split}.jsonl``
    (and .json) under ``root``; only ``all/`` when it is there, as it holds every subject."""
    if (root / "all").is_dir():
        root = root / "all"
    found = [p for p in sorted(root.rglob("*")) if p.is_file() and
             p.suffix.lower() in (".parquet", ".jsonl", ".json") and
             (p.stem == split or p.stem.startswith(f"{split}-"))]
    if not found:
        raise GptforgeError(f"{root}: no '{split}' files ({split}-*.parquet, {split}.jsonl or "
                            f"{split}.json) in the cais/mmlu layout, and no {split}/ folder of "
                            "CSV files (the hendrycks/test layout)")
    return found


def read_record_exam(records: Iterator[tuple[str, Any]],
                     dev_records: Iterator[tuple[str, Any]] | None, shots: int,
                     default_subject: str) -> list[Example]:
    by_subject: dict[str, list[Question]] = {}
    for where, record in records:
        subject, question = record_question(record, where)
        by_subject.setdefault(subject or default_subject, []).append(question)
    dev: dict[str, list[Question]] = {}
    for where, record in dev_records or ():
        subject, question = record_question(record, where)
        dev.setdefault(subject or default_subject, []).append(question)
    examples = []
    for subject, questions in by_subject.items():
        shot_rows = take_shots(dev.get(subject, []), shots, f"dev split of '{subject}'") \
            if shots else []
        examples += to_examples(EXAMS["mmlu"], subject.replace("_", " "), questions, shot_rows)
    return examples


def _chain(paths: list[Path]) -> Iterator[tuple[str, Any]]:
    for path in paths:
        yield from table_records(path)


def read_mmlu_records(path: Path, split: str, shots: int) -> list[Example]:
    """The cais/mmlu layout: a folder of split files, or one file (its dev sibling for shots)."""
    if path.is_dir():
        files = split_files(path, split)
        dev = split_files(path, "dev") if shots else []
    else:
        files = [path]
        dev = sorted(p for p in path.parent.iterdir() if p.stem == "dev" or
                     p.stem.startswith("dev-")) if shots else []
        if shots and not dev:
            raise GptforgeError(f"{path}: no dev file beside it (dev.jsonl, dev-*.parquet) for "
                                f"the {shots}-shot examples")
    return read_record_exam(_chain(files), _chain(dev) if dev else None, shots, path.stem)


def read_exam(fmt: str, spec: str, split: str | None, shots: int,
              hf_records=None) -> list[Example]:
    """The examples of an exam in any layout above; ``hf_records(spec)`` reads ``hf:`` specs."""
    if spec.startswith("hf:"):
        if fmt != "mmlu":
            raise GptforgeError(f"{spec}: {fmt} is read from a local copy of its CSV files")
        base, _, given = spec.partition("@")
        split = split or given or EXAMS[fmt].split
        records = hf_records(f"{base}@{split}")
        dev = hf_records(f"{base}@dev") if shots else None
        return read_record_exam(records, dev, shots, "")
    split = split or EXAMS[fmt].split
    path = Path(spec)
    if not path.exists():
        raise GptforgeError(f"no such task file or folder: {path}")
    csv_root = path / "data" if (path / "data").is_dir() else path
    if fmt != "mmlu" or (path.is_dir() and (csv_root / split).is_dir()):
        if not path.is_dir():
            raise GptforgeError(f"{path}: --task-format {fmt} reads a folder with the split "
                                "folders (dev/, test/, ...)")
        return read_csv_exam(fmt, path, split, shots)
    return read_mmlu_records(path, split, shots)
