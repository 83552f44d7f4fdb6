"""Prepare at scale: resuming an interrupted run, exact-duplicate removal, Hugging Face sources."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gptforge.data import journal as journal_module
from gptforge.data import prepare as prepare_module
from gptforge.data import shards as shards_module
from gptforge.data.manifest import read_manifest
from gptforge.data.prepare import prepare
from gptforge.errors import GptforgeError

SHARD_TOKENS = 120  # with val_fraction 0.3, the corpus below completes train and val shards
TIMING_KEYS = {"created_at", "duration_s"}
TIMING_STATS = {"tokenizer_s", "encode_s", "tokens_per_s"}


def story(i: int) -> str:
    return f"Story {i}.\nOnce upon a time fox number {i} ran {'far ' * (i % 7)}away.\n"


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture
def corpus(tmp_path):
    """80 stories and 6 exact repeats of earlier ones, one JSONL document each."""
    texts = [story(i) for i in range(80)]
    texts[30:30] = texts[:3]
    texts += [texts[10], texts[50], texts[51]]
    return write_jsonl(tmp_path / "corpus.jsonl", texts)


@pytest.fixture
def long_text(tmp_path, monkeypatch):
    """One long document: split by position, and encoded in many chunks."""
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 300)
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 600)
    path = tmp_path / "book.txt"
    path.write_text("".join(f"Line {i}: the fox ran {'far ' * (i % 5)}away.\n" for i in range(400)))
    return path


def run(inputs, out, **kwargs):
    kwargs.setdefault("tokenizer", "bpe")
    kwargs.setdefault("vocab_size", 300)
    kwargs.setdefault("workers", 1)
    kwargs.setdefault("shard_tokens", SHARD_TOKENS)
    kwargs.setdefault("val_fraction", 0.3)
    return prepare([str(i) for i in inputs], out, progress=False, **kwargs)


def untimed(manifest: dict) -> dict:
    manifest = {k: v for k, v in manifest.items() if k not in TIMING_KEYS}
    manifest["stats"] = {k: v for k, v in manifest["stats"].items() if k not in TIMING_STATS}
    manifest["settings"] = {k: v for k, v in manifest["settings"].items() if k != "workers"}
    return manifest


def assert_same_output(a, b):
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        if rel.name != "manifest.json":
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert untimed(read_manifest(a)) == untimed(read_manifest(b))


class Interrupt(Exception):
    """Stands in for Ctrl-C or a crash at a chosen point."""


def interrupt_after_shards(monkeypatch, shards: int, before_journal: bool = False) -> None:
    """Raise once ``shards`` shards are complete: after the journal says so, or just before."""
    original = prepare_module.SplitWriter._complete_shard
    count = 0

    def complete(self, *args):
        nonlocal count
        count += 1
        if before_journal and count == shards:
            self._writer.close()  # the shard is on disk, the journal does not know it yet
            raise Interrupt
        original(self, *args)
        if count == shards:
            raise Interrupt

    monkeypatch.setattr(prepare_module.SplitWriter, "_complete_shard", complete)


def interrupt_mid_shard(monkeypatch, writes: int) -> None:
    original = prepare_module.SplitWriter.write
    count = 0

    def write(self, item):
        nonlocal count
        count += 1
        if count == writes:
            raise Interrupt
        original(self, item)

    monkeypatch.setattr(prepare_module.SplitWriter, "write", write)


def record_encoding(monkeypatch) -> list:
    """Every chunk encoded from now on, as ``(split, index, chunk, tokens written)``."""
    encoded = []
    original = prepare_module.encode_pieces

    def encode(tokenizer, batch, dtype, use_batch_api=True):
        out = original(tokenizer, batch, dtype, use_batch_api)
        encoded.extend((e.split, e.index, e.chunk, len(e.tokens) - e.skip_tokens) for e in out)
        return out

    monkeypatch.setattr(prepare_module, "encode_pieces", encode)
    return encoded


def journal_of(out):
    return json.loads((out.with_name(out.name + ".partial") / "progress.json").read_text())


# ---------------------------------------------------------------------------------- resuming


@pytest.mark.parametrize("source", ["corpus", "long_text"])
@pytest.mark.parametrize("how", ["after_journal", "before_journal", "mid_shard"])
def test_interrupted_prepare_resumes_where_it_stopped(source, how, request, tmp_path,
                                                      monkeypatch):
    path = request.getfixturevalue(source)
    shard_tokens = SHARD_TOKENS if source == "corpus" else 5 * SHARD_TOKENS
    reference = run([path], tmp_path / "reference", shard_tokens=shard_tokens)
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        if how == "mid_shard":
            interrupt_mid_shard(patch, writes=40 if source == "corpus" else 30)
        else:
            interrupt_after_shards(patch, 5, before_journal=how == "before_journal")
        with pytest.raises(Interrupt):
            run([path], out, shard_tokens=shard_tokens)
    assert not out.exists()
    progress = journal_of(out)["splits"]
    done = {split: p["shards"] for split, p in progress.items()}
    assert sum(done.values()) >= 3, done
    if source == "corpus":
        assert done["val"] >= 1  # both splits resume from a position of their own

    monkeypatch.setattr(prepare_module, "train_tokenizer", None)  # it must not be trained again
    encoded = record_encoding(monkeypatch)
    resumed = run([path], out, shard_tokens=shard_tokens)
    assert_same_output(tmp_path / "reference", out)
    assert resumed["dedup"] == reference["dedup"]
    assert not out.with_name("out.partial").exists()
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "tokenizer", "train", "val"]
    for split, info in progress.items():
        start = info["next"]
        mine = [e for e in encoded if e[0] == split]
        # Nothing before the split's resume position is encoded again, and exactly the tokens
        # after the completed shards are: they were neither re-encoded nor re-written.
        assert all((i, c) >= (start["piece"], start["chunk"]) for _, i, c, _ in mine)
        assert sum(n for *_, n in mine) == reference["splits"][split]["tokens"] - info["tokens"]
        assert info["tokens"] == info["shards"] * shard_tokens


class FullDisk:
    """A shard file on a disk that fills up after ``budget`` bytes (shared by all files)."""

    def __init__(self, file, budget: list[int]):
        self._file, self._budget, self._full = file, budget, False

    def write(self, data: bytes) -> int:
        if len(data) > self._budget[0]:
            self._full = True
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a file object raises it
        self._budget[0] -= len(data)
        return self._file.write(data)

    def close(self) -> None:
        self._file.close()
        if self._full:  # a buffered file fails again to flush what it holds
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._file, name)


def test_a_full_disk_stops_prepare_with_one_line_and_keeps_the_work(corpus, tmp_path,
                                                                       monkeypatch):
    reference = run([corpus], tmp_path / "reference")
    out = tmp_path / "out"
    budget = [6 * (64 + 2 * SHARD_TOKENS) + 100]  # room for six shards and a bit
    create = shards_module.create_temp_beside

    def create_on_full_disk(path):
        file, temp = create(path)
        return FullDisk(file, budget), temp

    with monkeypatch.context() as patch:
        patch.setattr(shards_module, "create_temp_beside", create_on_full_disk)
        with pytest.raises(GptforgeError) as failed:
            run([corpus], out)
    message = str(failed.value)
    assert "\n" not in message and "No space left on device" in message
    assert re.search(r"writing \S+/out\.partial/(train|val)/shard_\d{6}\.bin failed", message)
    assert "free some disk space and run the same command again to continue" in message
    assert sum(p["shards"] for p in journal_of(out)["splits"].values()) >= 4  # (two in writing)
    assert not list(out.with_name("out.partial").rglob("*.tmp"))  # unfinished shards dropped
    run([corpus], out)
    assert_same_output(tmp_path / "reference", out)
    assert reference["splits"] == read_manifest(out)["splits"]


def test_resume_with_other_workers_and_a_second_interruption(corpus, tmp_path, monkeypatch):
    run([corpus], tmp_path / "reference")
    out = tmp_path / "out"
    for shards in (3, 4):  # each run gets 3 or 4 shards further
        with monkeypatch.context() as patch:
            interrupt_after_shards(patch, shards)
            with pytest.raises(Interrupt):
                run([corpus], out)
    assert sum(p["shards"] for p in journal_of(out)["splits"].values()) == 7
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 150)
    run([corpus], out, workers=2)
    assert_same_output(tmp_path / "reference", out)


def test_changed_settings_or_inputs_start_over(corpus, tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupt_after_shards(patch, 4)
        with pytest.raises(Interrupt):
            run([corpus], out)
    caplog.set_level(logging.INFO)
    with monkeypatch.context() as patch:
        interrupt_after_shards(patch, 2)
        with pytest.raises(Interrupt):
            run([corpus], out, seed=7)
    assert "made with other settings or inputs (changed: seed); starting over" in caplog.text
    with corpus.open("a") as f:
        f.write(json.dumps({"text": "one more story"}) + "\n")
    encoded = record_encoding(monkeypatch)
    manifest = run([corpus], out, seed=7)
    assert "(changed: sources); starting over" in caplog.text
    assert sum(n for *_, n in encoded) == sum(s["tokens"] for s in manifest["splits"].values())
    run([corpus], tmp_path / "fresh", seed=7)
    assert_same_output(tmp_path / "fresh", out)


def test_filters_rates_and_templates_resume_to_the_same_output(tmp_path, monkeypatch, caplog):
    from gptforge.data.filters import FilterSettings

    records = [{"title": f"Poem {i}", "lines": story(i).splitlines()} for i in range(70)]
    records += [{"title": "Again", "lines": story(i).splitlines()} for i in range(0, 70, 9)]
    records += [{"title": "x", "lines": []}] * 3  # too short
    poems = tmp_path / "poems.jsonl"
    poems.write_text("".join(json.dumps(r) + "\n" for r in records))
    notes = tmp_path / "notes.txt"
    notes.write_text("".join(f"note {i}: the fox ran {'far ' * (i % 3)}off\n" for i in range(30)))
    inputs = [poems, notes]
    options = {"template": "{title}\n{lines}", "text_unit": "lines", "seed": 3,
               "input_rates": [f"{notes}=1.5"],
               "filters": FilterSettings(min_chars=12, near_dedup=0.7)}
    reference = run(inputs, tmp_path / "reference", **options)
    removed = reference["filters"]["removed"]
    assert removed["near_duplicate"]["documents"] >= 8 and removed["min_chars"]["documents"] == 3
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupt_after_shards(patch, 4)
        with pytest.raises(Interrupt):
            run(inputs, out, **options)
    caplog.set_level(logging.INFO)
    run(inputs, out, **options)
    assert "starting over" not in caplog.text
    assert_same_output(tmp_path / "reference", out)
    with monkeypatch.context() as patch:
        interrupt_after_shards(patch, 2)
        with pytest.raises(Interrupt):
            run(inputs, tmp_path / "other", **options)
    run(inputs, tmp_path / "other", **{**options, "input_rates": None})
    assert "(changed: input_rates); starting over" in caplog.text


def test_restart_discards_the_earlier_work(corpus, tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupt_after_shards(patch, 4)
        with pytest.raises(Interrupt):
            run([corpus], out)
    caplog.set_level(logging.INFO)
    encoded = record_encoding(monkeypatch)
    manifest = run([corpus], out, resume=False)
    assert "--restart discards the earlier work; starting over" in caplog.text
    assert sum(n for *_, n in encoded) == sum(s["tokens"] for s in manifest["splits"].values())


def test_leftovers_of_a_killed_run_are_cleaned_and_damage_starts_over(corpus, tmp_path,
                                                                      monkeypatch, caplog):
    run([corpus], tmp_path / "reference")
    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    with monkeypatch.context() as patch:
        interrupt_after_shards(patch, 4)
        with pytest.raises(Interrupt):
            run([corpus], out)
    # What SIGKILL leaves: a half-written temporary shard, a shard the journal does not list.
    (partial / "train" / ".shard_000009.bin.0123456789ab.tmp").write_bytes(b"half")
    (partial / "train" / "shard_000009.bin").write_bytes(b"not listed")
    run([corpus], out)
    assert_same_output(tmp_path / "reference", out)

    with monkeypatch.context() as patch:
        interrupt_after_shards(patch, 4)
        with pytest.raises(Interrupt):
            run([corpus], out)
    (partial / "train" / "shard_000001.bin").write_bytes(b"truncated")
    caplog.set_level(logging.INFO)
    run([corpus], out)
    assert "a completed shard is damaged" in caplog.text and "starting over" in caplog.text
    assert_same_output(tmp_path / "reference", out)


def test_a_trained_tokenizer_is_kept_even_before_the_first_shard(corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupt_mid_shard(patch, writes=1)
        with pytest.raises(Interrupt):
            run([corpus], out)
    saved = journal_of(out)["tokenizer"]
    assert saved["kind"] == "bpe" and saved["trained"]
    monkeypatch.setattr(prepare_module, "train_tokenizer", None)
    manifest = run([corpus], out)
    assert manifest["tokenizer"]["sha256"] == saved["sha256"]


def test_a_second_prepare_into_the_same_directory_is_refused(corpus, tmp_path):
    partial = tmp_path / "out.partial"
    partial.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; "
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.lockf(fd, fcntl.LOCK_EX); "
         "print('locked', flush=True); time.sleep(60)", str(partial / ".lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(GptforgeError, match="is being written by another gptforge prepare"):
            run([corpus], tmp_path / "out")
    finally:
        holder.kill()
        holder.wait()
    run([corpus], tmp_path / "out")  # the lock went with the process


def test_refuses_a_partial_directory_it_did_not_make(corpus, tmp_path):
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "notes.txt").write_text("mine")
    with pytest.raises(GptforgeError, match=r"out\.partial exists and was not made by gptforge"):
        run([corpus], tmp_path / "out")
    assert (tmp_path / "out.partial" / "notes.txt").read_text() == "mine"


def test_journal_round_trip():
    journal = journal_module.Journal("f" * 64, {"seed": "0123456789abcdef"})
    journal.splits["val"] = journal_module.SplitProgress(2, 400, 9, 1234,
                                                         journal_module.Position(31, 2, 17))
    data = json.loads(json.dumps(journal.to_json()))
    assert data["splits"]["val"]["next"] == {"piece": 31, "chunk": 2, "skip_tokens": 17}
    assert journal_module.Journal.from_json(data) == journal


# ---------------------------------------------------------------------------------- dedup


def test_duplicates_are_removed_before_the_split(tmp_path):
    unique = [story(i) for i in range(60)]
    # Repeats of train and val documents, in a second file too: without dedup some land on the
    # other side of the split from their original.
    write_jsonl(tmp_path / "a.jsonl", unique[:40] + unique[:40:3])
    write_jsonl(tmp_path / "b.jsonl", unique[40:] + unique[5:15] + unique[45:50])
    write_jsonl(tmp_path / "unique.jsonl", unique)
    inputs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    manifest = run(inputs, tmp_path / "dedup")
    assert manifest["dedup"] == {"duplicates_removed": 29}
    assert manifest["settings"]["dedup"] is True
    # Same as preparing the corpus without its repeats: same split, same shards.
    run([tmp_path / "unique.jsonl"], tmp_path / "unique")
    for split in ("train", "val"):
        for name in manifest["splits"][split]["files"]:
            assert (tmp_path / "dedup" / name).read_bytes() == \
                (tmp_path / "unique" / name).read_bytes()

    kept = run(inputs, tmp_path / "kept", dedup=False)
    assert kept["dedup"] == {"duplicates_removed": None}
    assert kept["splits"]["train"]["documents"] + kept["splits"]["val"]["documents"] == 89


def test_dedup_compares_whole_texts_byte_for_byte(tmp_path):
    from gptforge.data.dedup import DuplicateFilter

    docs = [("a", "same"), ("b", "same "), ("c", "Same"), ("d", "same"), ("e", "same "),
            ("f", "\u00e9"), ("g", "e\u0301")]  # composed and decomposed é differ as bytes
    dedup = DuplicateFilter()
    assert [label for label, _ in dedup(docs)] == ["a", "b", "c", "f", "g"]
    assert dedup.duplicates_removed == 2


# ---------------------------------------------------------------------------------- HF datasets


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    """``datasets`` that can reach nothing but local files."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_home" / "datasets")
    return datasets


def test_hf_json_and_parquet_give_the_same_shards_as_the_files(corpus, tmp_path, hf_offline):
    reference = run([corpus], tmp_path / "reference", tokenizer="char", vocab_size=None)
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}),
                   tmp_path / "pq" / "train.parquet", row_group_size=16)
    via_json = run(["hf:json@train"], tmp_path / "json", tokenizer="char", vocab_size=None,
                   hf_data_files=[str(corpus)])
    via_dir = run([f"hf:{tmp_path / 'pq'}@train"], tmp_path / "dir", tokenizer="char",
                  vocab_size=None)
    for manifest, out in ((via_json, "json"), (via_dir, "dir")):
        assert manifest["splits"] == reference["splits"] and manifest["dedup"] == reference["dedup"]
        for split in ("train", "val"):
            for name in manifest["splits"][split]["files"]:
                assert (tmp_path / out / name).read_bytes() == \
                    (tmp_path / "reference" / name).read_bytes()
    source = via_json["sources"][0]
    assert source["hf"] == "hf:json@train" and source["split"] == "train"
    assert source["revision"] is None and source["files"][0] == reference["sources"][0]
    assert via_dir["sources"][0]["files"][0]["path"] == str(tmp_path / "pq" / "train.parquet")


def test_hf_source_errors_are_one_actionable_line(tmp_path, hf_offline):
    from gptforge.data.sources import iter_documents

    pq.write_table(pa.table({"body": ["x", "y"], "n": [1, 2]}), tmp_path / "t.parquet")
    write_jsonl(tmp_path / "nums.jsonl", [1, 2])
    cases = [
        (["hf:parquet"], [str(tmp_path / "t.parquet")], "text",
         r"hf:parquet: no column 'text' \(columns: body, n\); use --text-field"),
        (["hf:parquet"], [str(tmp_path / "t.parquet")], "n",
         r"hf:parquet row 0: column 'n' holds int, not a string"),
        (["hf:json"], [], "text", r"hf:json: the 'json' loader reads local files; name them "
                                  r"with --hf-data-files"),
        (["hf:json"], [str(tmp_path / "*.nothing")], "text", r"no files match the pattern"),
        (["hf:@train"], [], "text", r"hf:@train: no dataset name \(syntax: hf:NAME"),
        (["hf:parquet@"], [], "text", r"empty split after '@'"),
        ([str(tmp_path / "t.parquet")], [str(tmp_path / "t.parquet")], "body",
         r"--hf-data-files applies only to an hf: input"),
        (["hf:parquet@test"], [str(tmp_path / "t.parquet")], "body",
         r"hf:parquet@test: cannot load the dataset \(.*test"),
    ]
    for inputs, files, field, message in cases:
        with pytest.raises(GptforgeError, match=message):
            list(iter_documents(inputs, field, files))
    with pytest.raises(GptforgeError, match=r"hf:parquet: no column 'text' \(columns: body, n"):
        run(["hf:parquet"], tmp_path / "out", hf_data_files=[str(tmp_path / "t.parquet")])
    assert not (tmp_path / "out.partial").exists()


def test_hf_sources_mix_with_files_in_order(tmp_path, hf_offline):
    from gptforge.data.sources import iter_documents

    (tmp_path / "a.txt").write_text("first")
    write_jsonl(tmp_path / "b.jsonl", ["second", None, "third"])
    (tmp_path / "c.txt").write_text("fourth")
    got = list(iter_documents([str(tmp_path / "a.txt"), "hf:json", str(tmp_path / "c.txt")],
                              "text", [str(tmp_path / "b.jsonl")]))
    assert [text for _, text in got] == ["first", "second", "third", "fourth"]
    assert got[2][0] == "hf:json row 2"


def test_hf_rows_render_through_a_template_or_an_array_column(tmp_path, hf_offline):
    from gptforge.data.rendering import RecordTemplate
    from gptforge.data.sources import DocumentShape, iter_documents

    rows = [{"title": "静夜思", "lines": ["床前明月光", "疑是地上霜"]}, {"title": "t", "lines": []}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shape = DocumentShape(template=RecordTemplate("{title}\n{lines}"))
    got = list(iter_documents(["hf:json"], hf_data_files=[str(tmp_path / "p.jsonl")],
                              shape=shape))
    assert got == [("hf:json row 0", "静夜思\n床前明月光\n疑是地上霜"), ("hf:json row 1", "t\n")]
    got = list(iter_documents(["hf:json"], "lines", [str(tmp_path / "p.jsonl")]))
    assert got == [("hf:json row 0", "床前明月光\n疑是地上霜")]
    with pytest.raises(GptforgeError, match=r"hf:json row 0: no field 'author' \(fields: "
                                            r"title, lines\); fix --template"):
        list(iter_documents(["hf:json"], hf_data_files=[str(tmp_path / "p.jsonl")],
                            shape=DocumentShape(template=RecordTemplate("{author}"))))


def test_missing_datasets_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(GptforgeError, match=r"pip install 'gptforge\[hf\]'"):
        run(["hf:HuggingFaceFW/fineweb-edu:sample-10BT@train"], tmp_path / "out")


def test_a_hub_dataset_is_pinned_to_its_current_commit(hf_offline, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from gptforge.data.huggingface import parse_hf_spec

    class FakeApi:
        def dataset_info(self, name):
            assert name == "org/corpus"
            return type("Info", (), {"sha": "c0ffee"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert parse_hf_spec("hf:org/corpus:en@validation").revision is None  # offline: not asked
    monkeypatch.setattr(hf_offline.config, "HF_HUB_OFFLINE", False)
    source = parse_hf_spec("hf:org/corpus:en@validation")
    assert (source.name, source.config, source.split, source.revision) == (
        "org/corpus", "en", "validation", "c0ffee")
