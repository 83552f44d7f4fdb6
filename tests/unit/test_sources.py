"""Reading documents from every supported format, and one-line errors for every bad input."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gptforge.data.sources import iter_documents, resolve_inputs
from gptforge.errors import GptforgeError


def docs(*inputs, text_field="text"):
    return list(iter_documents([str(i) for i in inputs], text_field))


def test_text_and_markdown_are_one_document_each(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    (tmp_path / "b.md").write_bytes("\ufeff# Title\n".encode())  # a BOM is dropped
    assert docs(tmp_path / "a.txt", tmp_path / "b.md") == [
        (str(tmp_path / "a.txt"), "line one\nline two\n"),
        (str(tmp_path / "b.md"), "# Title\n"),
    ]


def test_jsonl_objects_and_strings_blank_lines_and_nulls(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "first", "id": 1}\n\n   \n"a bare string"\n{"text": null}\n'
                    '{"text": ""}\n{"text": "last\\nline"}\n')
    assert docs(path) == [(f"{path}:1", "first"), (f"{path}:4", "a bare string"),
                          (f"{path}:7", "last\nline")]


def test_json_array_of_objects_or_strings_or_one_object(tmp_path):
    (tmp_path / "objects.json").write_text(json.dumps([{"body": "x"}, {"body": "y"}]))
    (tmp_path / "strings.json").write_text(json.dumps(["p", "q"]))
    (tmp_path / "one.json").write_text(json.dumps({"body": "z", "other": 1}))
    got = docs(tmp_path / "objects.json", tmp_path / "strings.json", tmp_path / "one.json",
               text_field="body")
    assert [text for _, text in got] == ["x", "y", "p", "q", "z"]
    assert got[1][0] == f"{tmp_path / 'objects.json'}[1]"


def test_parquet_streams_row_groups(tmp_path):
    path = tmp_path / "d.parquet"
    table = pa.table({"id": list(range(5)), "content": ["a", "b", None, "d", "e"]})
    pq.write_table(table, path, row_group_size=2)
    got = docs(path, text_field="content")
    assert [t for _, t in got] == ["a", "b", "d", "e"]
    assert got[2][0] == f"{path}:row 3"


def test_directories_are_recursive_sorted_and_skip_hidden_and_unknown(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("1")
    (tmp_path / "b" / "c.jsonl").write_text('{"text": "2"}\n')
    (tmp_path / "b" / "image.png").write_bytes(b"\x89PNG\x00")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    assert resolve_inputs([str(tmp_path)]) == [tmp_path / "a.txt", tmp_path / "b" / "c.jsonl"]
    assert [t for _, t in docs(tmp_path)] == ["1", "2"]


def test_globs_and_duplicates(tmp_path):
    for name in ("x2.txt", "x1.txt", "y.txt"):
        (tmp_path / name).write_text(name)
    files = resolve_inputs([str(tmp_path / "x*.txt"), str(tmp_path / "x1.txt")])
    assert files == [tmp_path / "x1.txt", tmp_path / "x2.txt"]  # sorted, each once


def test_a_glob_may_match_directories_without_text(tmp_path):
    # 'corpus/**' also matches corpus/images/: like unsupported files, it adds nothing.
    (tmp_path / "corpus" / "images").mkdir(parents=True)
    (tmp_path / "corpus" / "images" / "a.png").write_bytes(b"\x89PNG")
    (tmp_path / "corpus" / "empty").mkdir()
    (tmp_path / "corpus" / "text").mkdir()
    (tmp_path / "corpus" / "text" / "b.txt").write_text("b")
    (tmp_path / "corpus" / "a.txt").write_text("a")
    expected = [tmp_path / "corpus" / "a.txt", tmp_path / "corpus" / "text" / "b.txt"]
    for pattern in ("corpus/**", "corpus/*"):
        assert resolve_inputs([str(tmp_path / pattern)]) == expected
    with pytest.raises(GptforgeError, match=r"the pattern '.*images\*' matches no files of a "
                                            r"supported type"):
        resolve_inputs([str(tmp_path / "corpus" / "images*")])


def bad_input(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("name, content, text_field, message", [
    ("d.dat", "hello", "text", r"d\.dat: unsupported file type '\.dat'"),
    ("bin.txt", b"abc\x00def", "text", r"bin\.txt: NUL byte at byte offset 3"),
    ("latin1.txt", "caf\u00e9".encode("latin-1"), "text",
     r"latin1\.txt: not valid UTF-8 \(byte offset 3\)"),
    ("d.jsonl", '{"text": "a"}\n' * 6 + '{"text": oops}\n', "text",
     r"d\.jsonl:7: invalid JSON \(Expecting value at column 10\)"),
    ("d.jsonl", '{"text": "a"}\n{"text": "b"}\n{"a": 1, "b": 2}\n', "text",
     r"d\.jsonl:3: no field 'text' \(fields: a, b\); use --text-field"),
    ("d.jsonl", '{"text": 5}\n', "text", r"d\.jsonl:1: field 'text' is a number, not a string"),
    ("d.jsonl", '[1, 2]\n', "text", r"d\.jsonl:1: expected an object with field 'text'"),
    ("d.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n', "text",
     r"d\.jsonl:2: not valid UTF-8 \(byte offset 25\)"),
    ("d.jsonl", '{"text": "\\ud800"}\n', "text",
     r"d\.jsonl:1: the text holds an unpaired surrogate"),
    ("d.json", '{"text": "a",\n "x": }', "text", r"d\.json:2: invalid JSON"),
    ("d.json", '42', "text", r"d\.json: expected a JSON array of documents"),
    ("d.jsonl", '{"text": "a"}\n' + "[" * 100_000 + "]" * 100_000 + "\n", "text",
     r"d\.jsonl:2: invalid JSON \(nested too deeply\)"),
    ("d.json", "[" * 100_000 + "]" * 100_000, "text",
     r"d\.json: invalid JSON \(nested too deeply\)"),
    ("d.json", '[{"text": "a"}, {"body": "b"}]', "text", r"d\.json\[1\]: no field 'text' "
                                                         r"\(fields: body\)"),
    ("empty.txt", "", "text", r"no text in the inputs: the 1 file\(s\) hold only empty documents"),
    ("blank.jsonl", '{"text": "  \\n"}\n\n', "text", r"no text in the inputs"),
])
def test_bad_inputs_name_the_file_and_line(tmp_path, name, content, text_field, message):
    path = bad_input(tmp_path, name, content)
    with pytest.raises(GptforgeError, match=message) as err:
        docs(path, text_field=text_field)
    assert "\n" not in str(err.value)
    if "no text" not in message:
        assert str(path) in str(err.value)


def test_parquet_errors_list_the_columns(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": [1], "body": ["x"]}), path)
    with pytest.raises(GptforgeError, match=r"d\.parquet: no column 'text' \(columns: id, body\); "
                                            r"use --text-field"):
        docs(path)
    with pytest.raises(GptforgeError, match=r"d\.parquet: column 'id' holds int64, not strings"):
        docs(path, text_field="id")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(GptforgeError, match=r"broken\.parquet: not a readable Parquet file"):
        docs(broken)
    # A damaged footer: pyarrow's message spans lines; ours stays on one.
    pq.write_table(pa.table({"text": ["x"] * 100}), broken)
    data = bytearray(broken.read_bytes())
    footer_start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    data[footer_start:footer_start + 20] = bytes(20)
    broken.write_bytes(bytes(data))
    with pytest.raises(GptforgeError, match=r"broken\.parquet: not a readable Parquet file \(.+\)$"
                       ) as err:
        docs(broken)
    assert "\n" not in str(err.value)


def test_damaged_parquet_data_is_one_line_naming_the_file(tmp_path):
    # The footer is intact, so the file opens; the second row group's page header is zeroed.
    path = tmp_path / "damaged.parquet"
    pq.write_table(pa.table({"text": [f"document {i} " * 20 for i in range(3000)]}), path,
                   row_group_size=1000)
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    data[start:start + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(GptforgeError, match=r"damaged\.parquet:row \d+: cannot read the Parquet "
                                            r"data \(.*\); the file is damaged") as err:
        docs(path)
    assert "\n" not in str(err.value)


def test_dictionary_encoded_string_column_is_text(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": pa.array(["a", "b", "a", None]).dictionary_encode()}), path)
    assert [text for _, text in docs(path)] == ["a", "b", "a"]
    pq.write_table(pa.table({"text": pa.array([1, 2]).dictionary_encode()}), path)
    with pytest.raises(GptforgeError, match=r"column 'text' holds .*int64.*, not strings"):
        docs(path)

def test_missing_paths_globs_and_empty_directories(tmp_path):
    with pytest.raises(GptforgeError, match=r"^no such file: .*nope\.txt$"):
        resolve_inputs([str(tmp_path / "nope.txt")])
    with pytest.raises(GptforgeError, match=r"no files match the pattern '.*\*\.jsonl'"):
        resolve_inputs([str(tmp_path / "*.jsonl")])
    (tmp_path / "only.csv").write_text("a,b")
    with pytest.raises(GptforgeError, match=r"directory holds no supported files"):
        resolve_inputs([str(tmp_path)])
    with pytest.raises(GptforgeError, match=r"no input given"):
        resolve_inputs([])
