"""Reading training documents out of the user's files, one at a time.

A *document* is a unit of text that ends with an end-of-text token in the token stream: a whole
``.txt``/``.md`` file, one line of a ``.jsonl`` file, one item of a ``.json`` array, one row of a
``.parquet`` file. Documents are streamed, never collected, so corpora larger than memory work.
A :class:`DocumentShape` can say otherwise: one document per line (or per blank-line separated
paragraph) of a text file, and the text of a record taken from a field that is an array of
strings, or rendered from several fields by a template (:mod:`~gptforge.data.rendering`).

Every problem with the input is reported as a one-line :class:`GptforgeError` naming the file and,
where there is one, the line or row, because a bad line in a 10 GB file is otherwise hopeless to
find.

An input may also name a Hugging Face dataset, ``hf:NAME[:CONFIG][@SPLIT]``
(:mod:`~gptforge.data.huggingface`); its rows are documents like a Parquet file's.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptforge.data.rendering import RecordTemplate, field_text, json_type, lookup
from gptforge.errors import GptforgeError
from gptforge.tokenizer.base import surrogate_problem

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".json", ".parquet")
_GLOB_CHARS = frozenset("*?[")
_PARQUET_BATCH_ROWS = 1024
TEXT_UNITS = ("file", "lines", "paragraphs")  # what one document of a .txt/.md file is
_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t\r]*\n)+")  # one or more blank lines


@dataclass(frozen=True)
class DocumentShape:
    """How the inputs' files and records become documents.

    ``text_field`` is the field (column) holding a record's text; ``template``, when set, renders
    the text from several fields instead; ``text_unit`` is what one document of a ``.txt`` or
    ``.md`` file is: the whole ``file``, each of its ``lines``, or each ``paragraphs`` (text
    between blank lines).
    """

    text_field: str = "text"
    template: RecordTemplate | None = None
    text_unit: str = "file"

    def __post_init__(self) -> None:
        if self.text_unit not in TEXT_UNITS:
            raise GptforgeError(f"--split {self.text_unit!r}: choose {', '.join(TEXT_UNITS)}")

    def record_text(self, record: Any, where: str) -> str | None:
        """The text of one record, a JSON value or a row; None when it has none (null)."""
        if self.template is not None:
            text = self.template.render(record, where)
        elif isinstance(record, dict):
            if self.text_field not in record and "." not in self.text_field:
                fields = ", ".join(map(str, record)) or "none"
                raise GptforgeError(f"{where}: no field '{self.text_field}' (fields: {fields}); "
                                    "use --text-field")
            value = lookup(record, self.text_field, where, "--text-field")
            text = field_text(value, self.text_field, where)
        elif isinstance(record, str):
            text = record
        else:
            raise GptforgeError(f"{where}: expected an object with field '{self.text_field}' or "
                                f"a string, got {json_type(record)}")
        if text is not None:
            _check_encodable(text, where)
        return text


def _shape(text_field: str, shape: DocumentShape | None) -> DocumentShape:
    return shape if shape is not None else DocumentShape(text_field)


def resolve_inputs(inputs: list[str]) -> list[Path]:
    """Expand ``inputs`` (files, directories, globs) into the list of files to read, in order.

    Directories are searched recursively for files with a supported suffix, skipping hidden
    entries, in sorted order; glob matches are sorted too. A file named twice is read once.
    """
    if not inputs:
        raise GptforgeError("no input given; pass files, directories or globs with --input")
    files: list[Path] = []
    for item in inputs:
        files.extend(_resolve_one(str(item)))
    unique = list(dict.fromkeys(files))
    if len(unique) < len(files):
        log.info("inputs name %d files more than once; each is read once", len(files) - len(unique))
    return unique


def _resolve_one(item: str) -> list[Path]:
    if _GLOB_CHARS & set(item) and not Path(item).exists():
        matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
        if not matches:
            raise GptforgeError(f"no files match the pattern {item!r}")
        files: list[Path] = []
        for match in matches:
            path = Path(match)
            if path.is_dir():  # may hold nothing to read ('corpus/**' matches corpus/images/)
                files.extend(_scan_directory(path, required=False))
            elif path.suffix.lower() in SUFFIXES:
                files.append(path.resolve())
        if not files:
            raise GptforgeError(f"the pattern {item!r} matches no files of a supported type "
                                f"({', '.join(SUFFIXES)})")
        return files
    path = Path(item).expanduser()
    if path.is_dir():
        return _scan_directory(path)
    if not path.exists():
        raise GptforgeError(f"no such file: {item}")
    _check_suffix(path)
    return [path.resolve()]


def _scan_directory(directory: Path, required: bool = True) -> list[Path]:
    files = sorted(
        p for p in directory.rglob("*")
        if p.is_file() and p.suffix.lower() in SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )
    if not files and required:
        raise GptforgeError(f"{directory}: directory holds no supported files "
                            f"({', '.join(SUFFIXES)})")
    return [p.resolve() for p in files]


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in SUFFIXES:
        raise GptforgeError(f"{path}: unsupported file type '{path.suffix or '(none)'}' "
                            f"(supported: {', '.join(SUFFIXES)})")


def resolve_sources(inputs: list[str], hf_data_files: list[str] | None = None) -> list:
    """Like :func:`resolve_inputs`, but ``hf:`` inputs become :class:`HFSource` objects.

    The result keeps the order of ``inputs``: file paths and Hugging Face datasets, mixed.
    ``hf_data_files`` are the local files that ``hf:`` builders such as ``hf:json`` read.
    """
    from gptforge.data.huggingface import is_hf_spec, parse_hf_spec

    if not inputs:
        raise GptforgeError("no input given; pass files, directories or globs with --input")
    if hf_data_files and not any(is_hf_spec(str(item)) for item in inputs):
        raise GptforgeError("--hf-data-files applies only to an hf: input, e.g. --input hf:json")
    sources: list = []
    files: list[str] = []
    for item in map(str, inputs):
        if is_hf_spec(item):
            sources.extend(resolve_inputs(files) if files else [])
            files = []
            sources.append(parse_hf_spec(item, hf_data_files or []))
        else:
            files.append(item)
    sources.extend(resolve_inputs(files) if files else [])
    return list(dict.fromkeys(sources))


def iter_documents(inputs: list[str], text_field: str = "text",
                   hf_data_files: list[str] | None = None,
                   shape: DocumentShape | None = None) -> Iterator[tuple[str, str]]:
    """Yield ``(label, text)`` for every non-empty document of ``inputs``, in order.

    ``label`` says where the document came from (``path``, ``path:line``, ``path[index]``,
    ``path:row N``) for error messages. Documents that are empty or only whitespace, and null
    values in JSON and Parquet, are skipped; finding no document at all is an error. ``shape``
    (default: the text of ``text_field``) says how files and records become documents.
    """
    yield from iter_source_documents(resolve_sources(inputs, hf_data_files), text_field, shape)


def iter_source_documents(sources: list, text_field: str = "text",
                          shape: DocumentShape | None = None) -> Iterator[tuple[str, str]]:
    """:func:`iter_documents` over what :func:`resolve_sources` returned."""
    count = 0
    for source in sources:
        for label, text in source_documents(source, _shape(text_field, shape)):
            count += 1
            yield label, text
    if count == 0:
        raise no_text_error(sources)


def no_text_error(sources: list) -> GptforgeError:
    """The error for inputs that hold no document at all."""
    kind = "file" if all(isinstance(s, Path) for s in sources) else "input"
    return GptforgeError(f"no text in the inputs: the {len(sources)} {kind}(s) hold only empty "
                         "documents")


def source_documents(source, shape: DocumentShape) -> Iterator[tuple[str, str]]:
    """The non-empty documents of one source (a file path or an ``hf:`` source)."""
    documents = read_file(source, shape=shape) if isinstance(source, Path) \
        else source.documents(shape.text_field, shape)
    for label, text in documents:
        if text and not text.isspace():
            yield label, text


def describe_file(path: Path) -> dict:
    """``{"path", "bytes", "sha256"}`` of one input file: what a manifest records about it."""
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
    except OSError as err:
        raise GptforgeError(f"{path}: cannot read ({err.strerror})") from None
    return {"path": str(path), "bytes": size, "sha256": digest.hexdigest()}


def read_file(path: Path, text_field: str = "text",
              shape: DocumentShape | None = None) -> Iterator[tuple[str, str]]:
    """Yield ``(label, text)`` for each document in one file, by its suffix."""
    shape = _shape(text_field, shape)
    suffix = path.suffix.lower()
    _check_suffix(path)
    if suffix in TEXT_SUFFIXES:
        if shape.text_unit == "lines":
            return _read_lines(path)
        if shape.text_unit == "paragraphs":
            return _read_paragraphs(path)
        return _read_text(path)
    if suffix == ".jsonl":
        return _read_jsonl(path, shape)
    if suffix == ".json":
        return _read_json(path, shape)
    return _read_parquet(path, shape)


def _read_text(path: Path) -> Iterator[tuple[str, str]]:
    yield str(path), decode_utf8(_read_bytes(path), str(path))


def utf8_lines(path: Path) -> Iterator[tuple[str, str]]:
    """``(path:line, line)`` for every line of a UTF-8 file, line end included; streamed, so the
    file may be any size. A line that is not UTF-8 is one error naming the file and line."""
    try:
        f = path.open("rb")
    except OSError as err:
        raise GptforgeError(f"{path}: cannot read ({err.strerror})") from None
    with f:
        offset = 0
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            yield where, decode_utf8(raw, where, offset)
            offset += len(raw)


def _read_lines(path: Path) -> Iterator[tuple[str, str]]:
    """One document per line, without its line end."""
    for where, line in utf8_lines(path):
        yield where, line.rstrip("\r\n")


def _read_paragraphs(path: Path) -> Iterator[tuple[str, str]]:
    """One document per paragraph (text between blank lines), labelled by its first line."""
    text = decode_utf8(_read_bytes(path), str(path))
    start = counted = 0
    line = 1
    for match in [*_PARAGRAPH_BREAK.finditer(text), None]:
        end = match.start() if match is not None else len(text)
        block = text[start:end].lstrip("\r\n")
        if block.strip():
            first = end - len(block)
            line += text.count("\n", counted, first)
            counted = first
            yield f"{path}:{line}", block.rstrip("\r\n")
        start = match.end() if match is not None else end


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise GptforgeError(f"{path}: cannot read ({err.strerror})") from None


def decode_utf8(data: bytes, where: str, offset: int = 0) -> str:
    """Decode UTF-8 (a leading BOM is dropped), refusing binary data with a precise location.

    ``offset`` is where ``data`` starts in its file, so the byte offset reported is the file's.
    """
    nul = data.find(b"\x00")
    if nul >= 0:
        raise GptforgeError(f"{where}: NUL byte at byte offset {offset + nul}: this is a binary "
                            "or UTF-16 file, not UTF-8 text; convert it to UTF-8 or leave it out")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise GptforgeError(f"{where}: not valid UTF-8 (byte offset {offset + err.start}); "
                            "convert the file to UTF-8, e.g. with iconv") from None
    return text[1:] if offset == 0 and text.startswith("\ufeff") else text


def jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    """``(path:line, value)`` for each non-blank line of a JSONL file; a line that is not UTF-8
    or not JSON is one error naming the file and line."""
    for where, line in utf8_lines(path):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise GptforgeError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") \
                from None
        except RecursionError:
            raise GptforgeError(f"{where}: invalid JSON (nested too deeply)") from None
        yield where, value


def json_value(path: Path) -> Any:
    """The value of a whole JSON file; errors name the file and line."""
    text = decode_utf8(_read_bytes(path), str(path))
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise GptforgeError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column "
                            f"{err.colno})") from None
    except RecursionError:
        raise GptforgeError(f"{path}: invalid JSON (nested too deeply)") from None


def _read_jsonl(path: Path, shape: DocumentShape) -> Iterator[tuple[str, str]]:
    for where, value in jsonl_records(path):
        text = shape.record_text(value, where)
        if text is not None:
            yield where, text


def _read_json(path: Path, shape: DocumentShape) -> Iterator[tuple[str, str]]:
    value = json_value(path)
    if isinstance(value, dict):
        doc = shape.record_text(value, str(path))
        if doc is not None:
            yield str(path), doc
        return
    if not isinstance(value, list):
        raise GptforgeError(f"{path}: expected a JSON array of documents or one object with field "
                            f"'{shape.text_field}', got {json_type(value)}")
    for index, item in enumerate(value):
        where = f"{path}[{index}]"
        doc = shape.record_text(item, where)
        if doc is not None:
            yield where, doc


def _check_encodable(text: str, where: str) -> None:
    problem = surrogate_problem(text)
    if problem:
        raise GptforgeError(f"{where}: {problem}; fix the \\uXXXX escape")


def _read_parquet(path: Path, shape: DocumentShape) -> Iterator[tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise GptforgeError(f"{path}: not a readable Parquet file ({_first_line(err)})") \
            from None
    columns = _parquet_columns(path, parquet.schema_arrow, shape)
    row = 0
    batches = parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns)
    while True:
        try:  # the footer was fine, but a data page can still be damaged
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as err:
            raise GptforgeError(f"{path}:row {row}: cannot read the Parquet data "
                                f"({_first_line(err)}); the file is damaged: re-download or "
                                "re-export it") from None
        if shape.template is None:
            texts = batch.column(0).to_pylist()
        else:
            texts = [shape.record_text(record, f"{path}:row {row + i}")
                     for i, record in enumerate(batch.to_pylist())]
        for text in texts:
            if isinstance(text, list):  # a column of string lists, checked by the schema
                text = "\n".join(t for t in text if t is not None)
            if text is not None:
                yield f"{path}:row {row}", text
            row += 1


def _parquet_columns(path: Path, schema, shape: DocumentShape) -> list[str]:
    """The columns to read: the template's, or the text column (strings or lists of them)."""
    import pyarrow as pa

    if shape.template is not None:
        columns = shape.template.columns(schema.names)
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise GptforgeError(f"{path}: no column '{missing[0]}' for --template (columns: "
                                f"{', '.join(schema.names)})")
        return columns
    field = shape.text_field
    if field not in schema.names:
        raise GptforgeError(f"{path}: no column '{field}' (columns: {', '.join(schema.names)}); "
                            "use --text-field")
    column_type = schema.field(field).type
    is_list = pa.types.is_list(column_type) or pa.types.is_large_list(column_type)
    if not _is_string_type(column_type.value_type if is_list else column_type):
        raise GptforgeError(f"{path}: column '{field}' holds {column_type}, not strings")
    return [field]


def _first_line(err: BaseException) -> str:
    """pyarrow's messages can span lines; an error here is one line."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _is_string_type(column_type) -> bool:
    """Whether a Parquet column holds text; dictionary-encoded text (pandas' category) counts."""
    import pyarrow as pa

    if pa.types.is_dictionary(column_type):
        column_type = column_type.value_type
    return (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
            or str(column_type) == "string_view")
