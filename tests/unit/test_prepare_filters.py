"""Data in the shapes people have: templates, array fields, one document per line, sampling rates,
quality filters (MinHash near-duplicates included) and their report, and dry runs."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gptforge.data.filters import (
    FilterSettings,
    MinHasher,
    NearDuplicateFilter,
    lsh_bands,
    punctuation_pattern,
)
from gptforge.data.mixing import copies
from gptforge.data.prepare import prepare, read_manifest
from gptforge.data.rendering import RecordTemplate, unescape
from gptforge.data.shards import open_split
from gptforge.data.sources import DocumentShape, iter_documents
from gptforge.errors import GptforgeError
from gptforge.tokenizer import EOS_TOKEN, load_tokenizer

POEMS = [
    {"title": "静夜思", "author": "李白",
     "paragraphs": ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"]},
    {"title": "春晓", "author": "孟浩然",
     "paragraphs": ["春眠不觉晓，处处闻啼鸟。", "夜来风雨声，花落知多少。"]},
]
POEM_TEMPLATE = unescape(r"{title}\n{author}\n{paragraphs}")


def docs(*inputs, **shape):
    return list(iter_documents([str(i) for i in inputs], shape=DocumentShape(**shape)))


def run(inputs, out, **kwargs):
    kwargs.setdefault("workers", 1)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("tokenizer", "char")
    return prepare([str(i) for i in inputs], out, **kwargs)


def decoded(out, split="train"):
    """The documents of a split, decoded from its shards."""
    tok = load_tokenizer(out / read_manifest(out)["tokenizer"]["file"])
    ids = np.concatenate(open_split(out, split)).tolist()
    return tok.decode(ids).split(EOS_TOKEN)[:-1]


# ------------------------------------------------------------------------ shapes of records


def test_the_poetry_layout_through_a_template_and_through_an_array_field(tmp_path):
    path = tmp_path / "poems.json"
    path.write_text(json.dumps(POEMS, ensure_ascii=False), encoding="utf-8")
    rendered = docs(path, template=RecordTemplate(POEM_TEMPLATE))
    assert rendered == [
        (f"{path}[0]", "静夜思\n李白\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"),
        (f"{path}[1]", "春晓\n孟浩然\n春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。"),
    ]
    assert [t for _, t in docs(path, text_field="paragraphs")] == [
        "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",
        "春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。"]


def test_templates_read_nested_fields_numbers_and_nulls_in_jsonl_and_parquet(tmp_path):
    records = [{"meta": {"src": "wiki", "year": 2024}, "body": ["a", "b"], "note": None},
               {"meta": {"src": "blog", "year": 1999}, "body": [], "note": "n"}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "r.parquet")
    template = RecordTemplate("[{meta.src} {meta.year}] {{x}} {body}|{note}")
    expected = ["[wiki 2024] {x} a\nb|", "[blog 1999] {x} |n"]
    assert [t for _, t in docs(tmp_path / "r.jsonl", template=template)] == expected
    assert [t for _, t in docs(tmp_path / "r.parquet", template=template)] == expected


def test_an_array_text_field_in_parquet_and_a_non_string_array_is_refused(tmp_path):
    pq.write_table(pa.table({"lines": [["x", "y"], None, ["z"]]}), tmp_path / "l.parquet")
    assert [t for _, t in docs(tmp_path / "l.parquet", text_field="lines")] == ["x\ny", "z"]
    (tmp_path / "bad.jsonl").write_text('{"p": ["a", 3]}\n')
    with pytest.raises(GptforgeError, match=r"bad\.jsonl:1: field 'p' is an array holding a "
                                            r"number at \[1\]"):
        docs(tmp_path / "bad.jsonl", text_field="p")


@pytest.mark.parametrize("template, good, bad, message", [
    ("{title}\n{autor}", {"title": "t", "autor": "a"}, {"title": "t", "author": "a"},
     r"d\.jsonl:2: no field 'autor' \(fields: title, author\); fix --template"),
    ("{meta.src}", {"meta": {"src": "s"}}, {"meta": {"url": "u"}},
     r"d\.jsonl:2: no field 'src' in 'meta' \(for 'meta\.src'\) \(fields: url\)"),
    ("{meta}", {"meta": "s"}, {"meta": {"url": "u"}}, r"d\.jsonl:2: field 'meta' is an object"),
])
def test_a_missing_template_field_names_the_file_line_and_field(tmp_path, template, good, bad,
                                                                message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(GptforgeError, match=message) as err:
        docs(path, template=RecordTemplate(template))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("no fields", "names no field"), ("{}", "every slot must name a field"),
    ("{x:>5}", "format, conversion or index"), ("{x", "expected '}'")])
def test_bad_templates_are_refused(text, message):
    with pytest.raises(GptforgeError, match=message):
        RecordTemplate(text)


def test_unescape_leaves_other_backslashes_and_non_ascii_alone():
    assert unescape(r"{a}\n{b}\t\\n\d 诗") == "{a}\n{b}\t\\n\\d 诗"


def test_one_document_per_line_or_paragraph_of_a_text_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"first line\r\nsecond\n\n  \nthird\nfourth\n")
    assert docs(path, text_unit="lines") == [
        (f"{path}:1", "first line"), (f"{path}:2", "second"), (f"{path}:5", "third"),
        (f"{path}:6", "fourth")]
    assert docs(path, text_unit="paragraphs") == [
        (f"{path}:1", "first line\r\nsecond"), (f"{path}:5", "third\nfourth")]


# ------------------------------------------------------------------------ filters


def chain_output(settings: FilterSettings, texts: list[str]) -> tuple[list[str], dict]:
    chain = settings.build()
    kept = [text for _, text in chain((str(i), t) for i, t in enumerate(texts))]
    return kept, chain.report()


@pytest.mark.parametrize("settings, texts, kept", [
    (FilterSettings(min_chars=5, dedup=False), ["abcd", "abcde", "诗" * 5], ["abcde", "诗" * 5]),
    (FilterSettings(max_bad_char_share=0.1, dedup=False),
     ["clean text here", "bad \ufffd\ufffd text", "tab\tand\nnewline ok", "ctrl \x07\x07\x07"],
     ["clean text here", "tab\tand\nnewline ok"]),
    (FilterSettings(max_punctuation_share=0.3, dedup=False),  # shares of visible characters
     ["Hello, world.", "!!! ??? ...", "床前明月光，疑是地上霜。", "a-b-c-d"],
     ["Hello, world.", "床前明月光，疑是地上霜。"]),
    (FilterSettings(min_script_share="cjk:0.5", dedup=False),
     ["床前明月光 hello", "床前 hello world", "12345 !!", "こんにちは世界", "안녕하세요"],
     ["床前明月光 hello", "こんにちは世界", "안녕하세요"]),
    (FilterSettings(min_script_share="latin:0.9", dedup=False),
     ["Café déjà vu", "Привет мир", "mixed Привет"], ["Café déjà vu"]),
    (FilterSettings(), ["same", "same ", "same", "Same"], ["same", "same ", "Same"]),
])
def test_each_filter_keeps_exactly_what_it_should(settings, texts, kept):
    got, report = chain_output(settings, texts)
    assert got == kept
    (name, removed), = report["removed"].items()
    assert removed == {"documents": len(texts) - len(kept),
                       "share": round((len(texts) - len(kept)) / len(texts), 6)}


def test_punctuation_class_is_unicode_category_p():
    pattern = punctuation_pattern()
    assert all(pattern.fullmatch(c) for c in "!,.-«»，。、「」؟")
    assert not any(pattern.fullmatch(c) for c in "a诗 $+=1")  # symbols are not punctuation


def test_a_document_counts_under_the_first_filter_that_refuses_it():
    settings = FilterSettings(min_chars=4, max_punctuation_share=0.5)
    kept, report = chain_output(settings, ["!!", "!!!!!", "words", "words", "ok"])
    assert kept == ["words"]
    assert report == {"documents": 5, "kept": 1, "removed": {
        "min_chars": {"documents": 2, "share": 0.4},
        "max_punctuation_share": {"documents": 1, "share": 0.2},
        "duplicate": {"documents": 1, "share": 0.2}}}


def test_a_chain_that_removes_everything_names_the_filter_that_removed_most():
    chain = FilterSettings(min_chars=10, max_bad_char_share=0.0).build()
    with pytest.raises(GptforgeError, match=r"the filters removed all 3 documents, 2 of them by "
                                            r"--min-chars; loosen that setting"):
        list(chain([("a", "short"), ("b", "tiny"), ("c", "long enough \ufffd")]))


@pytest.mark.parametrize("settings, message", [
    (FilterSettings(min_chars=0), "--min-chars must be at least 1"),
    (FilterSettings(max_punctuation_share=1.5), "--max-punctuation-share must be between"),
    (FilterSettings(min_script_share="klingon:0.5"), "SCRIPT one of arabic, cjk"),
    (FilterSettings(min_script_share="cjk"), "write SCRIPT:SHARE"),
    (FilterSettings(near_dedup=0.0), "--near-dedup must be a Jaccard similarity"),
])
def test_bad_filter_settings(settings, message):
    with pytest.raises(GptforgeError, match=message):
        settings.check()


# ------------------------------------------------------------------------ MinHash


def words_text(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice("abcdefghij") for _ in range(5)) for _ in range(n)]


def mutated(words: list[str], rate: float, rng: random.Random) -> str:
    return " ".join(w if rng.random() > rate else "zzqqx" for w in words)


def jaccard(a: str, b: str, k: int = 5) -> float:
    """Exact Jaccard similarity of the k-character shingle sets, by Python sets."""
    sa, sb = ({t[i:i + k] for i in range(len(t) - k + 1)} for t in (a, b))
    return len(sa & sb) / len(sa | sb)


def test_minhash_estimates_the_exact_jaccard_similarity():
    rng = random.Random(0)
    words = words_text(rng, 400)
    base = " ".join(words)
    errors = []
    for seed in (3, 4):
        hasher = MinHasher(perms=256, shingle_chars=5, seed=seed)
        for rate in (0.02, 0.1, 0.3, 0.6):
            other = mutated(words, rate, rng)
            exact = jaccard(base, other)
            estimate = float(np.mean(hasher.signature(base) == hasher.signature(other)))
            sigma = (exact * (1 - exact) / 256) ** 0.5
            assert abs(estimate - exact) < 4 * sigma + 0.01, (rate, exact, estimate)
            errors.append(estimate - exact)
    # Unbiased: the mean error of 8 estimates has a standard deviation of about 0.01 (weakly
    # mixed shingle hashes once gave +0.055).
    assert abs(np.mean(errors)) < 0.03, errors
    # Case and white space do not make a copy different.
    hasher = MinHasher(perms=256, shingle_chars=5)
    recased = base.upper().replace(" ", "\n ")
    assert np.array_equal(hasher.signature(base), hasher.signature(recased))


def test_lsh_bands_put_the_s_curve_step_at_the_threshold():
    for threshold in (0.5, 0.8, 0.9):
        bands, rows = lsh_bands(threshold, 128)
        assert bands * rows <= 128

        def caught(s, b=bands, r=rows):
            return 1 - (1 - s ** r) ** b
        assert caught(threshold - 0.25) < 0.1 and caught(min(threshold + 0.12, 1.0)) > 0.9


def test_near_duplicates_above_the_threshold_go_and_dissimilar_documents_stay():
    rng = random.Random(1)
    words = words_text(rng, 300)
    base = " ".join(words)
    near = [mutated(words, 0.01, rng) for _ in range(3)]  # Jaccard about 0.95
    far = [mutated(words, 0.5, rng) for _ in range(3)]  # Jaccard about 0.35
    assert all(jaccard(base, t) > 0.9 for t in near) and all(jaccard(base, t) < 0.5 for t in far)
    assert all(jaccard(a, b) < 0.6 for i, a in enumerate(far) for b in far[i + 1:])
    near_filter = NearDuplicateFilter(threshold=0.8)
    assert near_filter.keep(base)
    assert [near_filter.keep(t) for t in near + far] == [False] * 3 + [True] * 3


# ------------------------------------------------------------------------ sampling rates


def test_copies_hit_the_rate_deterministically():
    n = 4000
    for rate in (0.0, 1.0, 2.0, 3.0):
        assert {copies(rate, 7, 0, i) for i in range(n)} == {int(rate)}
    half = [copies(0.5, 7, 0, i) for i in range(n)]
    assert abs(sum(half) - n / 2) < 4 * (n * 0.25) ** 0.5 and set(half) == {0, 1}
    assert half == [copies(0.5, 7, 0, i) for i in range(n)]  # same seed, same choice
    assert half != [copies(0.5, 8, 0, i) for i in range(n)]
    assert half != [copies(0.5, 7, 1, i) for i in range(n)]  # each source its own choice
    one_and_half = sum(copies(1.5, 7, 0, i) for i in range(n))
    assert abs(one_and_half - 1.5 * n) < 4 * (n * 0.25) ** 0.5


def test_rates_in_prepare_and_copies_stay_in_their_split(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"alpha document {i}"}) + "\n"
                                              for i in range(40)))
    (tmp_path / "b.txt").write_text("".join(f"beta line {i}\n" for i in range(30)))
    inputs = [tmp_path / "a.jsonl", tmp_path / "b.txt"]
    manifest = run(inputs, tmp_path / "out", text_unit="lines", seed=5,
                   input_rates=[f"{tmp_path / 'a.jsonl'}=0.5", f"{tmp_path / 'b.txt'}=2"])
    (a_rate, b_rate) = manifest["sampling"]
    assert b_rate == {"source": str(tmp_path / "b.txt"), "rate": 2.0, "documents": 30,
                      "taken": 60}
    assert a_rate["documents"] == 40 and 10 <= a_rate["taken"] <= 30
    train, val = decoded(tmp_path / "out"), decoded(tmp_path / "out", "val")
    assert len(train) + len(val) == a_rate["taken"] + 60
    assert not set(train) & set(val)  # a repeated document never lands on both sides
    assert all((train + val).count(f"beta line {i}") == 2 for i in range(30))


def test_bad_rates_are_one_line(tmp_path):
    (tmp_path / "a.txt").write_text("some text\n")
    for rates, message in [(["a.txt=2"], "'a.txt' is not one of the --input items"),
                           ([f"{tmp_path / 'a.txt'}"], "write PATH=RATE"),
                           ([f"{tmp_path / 'a.txt'}=-1"], "write PATH=RATE"),
                           ([f"{tmp_path / 'a.txt'}=0"], "take no document")]:
        with pytest.raises(GptforgeError, match=message):
            run([tmp_path / "a.txt"], tmp_path / "out", input_rates=rates)


# ------------------------------------------------------------------------ prepare


def test_the_filter_report_is_in_the_manifest(tmp_path):
    texts = ([f"a good document number {i} with words" for i in range(30)]
             + ["short", "!!!!?????.....", "damaged \ufffd\ufffd\ufffd text"]
             + [f"a good document number {i} with words" for i in range(4)])
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    manifest = run([tmp_path / "d.jsonl"], tmp_path / "out", filters=FilterSettings(
        min_chars=8, max_bad_char_share=0.05, max_punctuation_share=0.5))
    removed = {k: v["documents"] for k, v in manifest["filters"]["removed"].items()}
    assert removed == {"min_chars": 1, "max_bad_char_share": 1, "max_punctuation_share": 1,
                       "duplicate": 4}
    assert manifest["filters"]["documents"] == 37 and manifest["filters"]["kept"] == 30
    assert manifest["dedup"] == {"duplicates_removed": 4}
    assert read_manifest(tmp_path / "out")["filters"] == manifest["filters"]
    assert manifest["settings"]["filters"]["min_chars"] == 8
    assert sorted(decoded(tmp_path / "out") + decoded(tmp_path / "out", "val")) == \
        sorted(texts[:30])


def test_a_dry_run_writes_nothing_and_shows_the_rendered_documents(tmp_path):
    path = tmp_path / "poems.json"
    path.write_text(json.dumps(POEMS * 3, ensure_ascii=False), encoding="utf-8")
    result = run([path], tmp_path / "out", template=POEM_TEMPLATE, dry_run=True,
                 preview_documents=1, tokenizer="bpe", vocab_size=300)
    assert result["samples"] == [{"label": f"{path}[0]", "chars": 32, "text":
                                  "静夜思\n李白\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"}]
    assert result["documents"] == 2 and result["filters"]["removed"]["duplicate"]["documents"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["poems.json"]
