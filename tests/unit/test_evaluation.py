"""Evaluation metrics against independent references: direct forwards, hand-computed
log-likelihoods, byte counts of the raw text, and the datasets' published field layouts."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gptforge.data.loader import TokenStream
from gptforge.errors import GptforgeError
from gptforge.eval.lm import evaluate_stream, sliding_windows, text_bytes, text_stream
from gptforge.eval.multiple_choice import (
    Example,
    accuracy,
    build_requests,
    evaluate_examples,
    score_requests,
    split_continuation,
)
from gptforge.eval.tasks import read_task
from gptforge.model import GPT
from gptforge.runtime.device import Precision
from gptforge.tokenizer import train_tokenizer
from tests.tiny_checkpoints import make_tokenizer, tiny_config

FP32 = Precision(torch.device("cpu"), torch.float32)
TEXT = "hello, how are you? I am fine. " * 6


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model(char_tokenizer):
    # A large init_std makes predictions peaked, so scoring the wrong positions changes the loss.
    torch.manual_seed(0)
    return GPT(tiny_config(char_tokenizer.vocab_size, block_size=16, init_std=0.3)).eval()


def stream_ids(tokenizer, documents: list[str]) -> list[int]:
    ids = [tokenizer.eos_id]
    for doc in documents:
        ids += tokenizer.encode(doc) + [tokenizer.eos_id]
    return ids


@torch.no_grad()
def target_nll(model, ids: list[int], targets: range, context: int) -> list[float]:
    """-log p(ids[t] | up to `context` tokens before it) for each t: one forward per target."""
    out = []
    for t in targets:
        x = torch.tensor([ids[max(0, t - context):t]])
        out.append(float(-F.log_softmax(model(x)[0, -1].float(), -1)[ids[t]]))
    return out


@torch.no_grad()
def chunked_nll(model, ids: list[int], block: int) -> list[float]:
    """Per-target NLL over consecutive windows of block + 1 tokens (the last one shorter)."""
    out = []
    for i in range(0, len(ids) - 1, block):
        chunk = torch.tensor(ids[i:i + block + 1])
        logits = model(chunk[None, :-1])[0]
        out += F.cross_entropy(logits.float(), chunk[1:], reduction="none").tolist()
    return out


# --------------------------------------------------------------------------- windows


@pytest.mark.parametrize("n_tokens, block, stride", [
    (2, 4, 4), (9, 4, 4), (10, 4, 4), (50, 8, 3), (50, 8, 1), (17, 8, 8), (31, 16, 15)])
def test_windows_score_each_target_once_with_enough_context(n_tokens, block, stride):
    scored = []
    for w in sliding_windows(n_tokens, block, stride):
        assert 0 < w.end - w.begin <= block
        targets = range(w.end - w.scored + 1, w.end + 1)
        for t in targets:  # predicted from stream[w.begin:t]
            assert t - w.begin >= min(t, block - stride + 1)
        scored += targets
    assert scored == list(range(1, n_tokens))


# --------------------------------------------------------------------------- language modelling


def test_loss_matches_a_direct_forward_over_the_same_windows(model, char_tokenizer):
    docs = [TEXT, "I am fine. hello?"]
    ids = stream_ids(char_tokenizer, docs)
    reference = chunked_nll(model, ids, block=16)
    stream = text_stream(char_tokenizer, ((str(i), d) for i, d in enumerate(docs)))
    result = evaluate_stream(model, char_tokenizer, stream, precision=FP32, batch_size=3)
    assert result.tokens == len(ids) - 1 == len(reference)
    assert result.windows == math.ceil((len(ids) - 1) / 16)
    assert result.loss == pytest.approx(sum(reference) / len(reference), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    # Char tokenizer on ASCII: one byte per text token. Bits per byte leave the end-of-text
    # targets out of the nats, as they encode no text.
    assert result.bytes == sum(len(d) for d in docs)
    text_nats = sum(n for n, t in zip(reference, ids[1:]) if t != char_tokenizer.eos_id)
    assert result.bits_per_byte == pytest.approx(text_nats / math.log(2) / result.bytes,
                                                 rel=1e-5)


def test_stride_one_predicts_every_token_from_a_full_window(model, char_tokenizer):
    ids = stream_ids(char_tokenizer, [TEXT[:60]])
    reference = target_nll(model, ids, range(1, len(ids)), context=16)
    stream = text_stream(char_tokenizer, [("doc", TEXT[:60])])
    result = evaluate_stream(model, char_tokenizer, stream, precision=FP32, stride=1,
                             batch_size=7)
    assert result.tokens == len(reference)
    assert result.loss == pytest.approx(sum(reference) / len(reference), rel=1e-5)


def test_stride_equal_to_block_size_is_the_non_overlapping_result(model, char_tokenizer):
    stream = text_stream(char_tokenizer, [("doc", TEXT)])
    plain = evaluate_stream(model, char_tokenizer, stream, precision=FP32)
    strided = evaluate_stream(model, char_tokenizer, stream, precision=FP32, stride=16,
                              batch_size=5)
    assert strided.loss == pytest.approx(plain.loss, rel=1e-6)
    assert (strided.tokens, strided.windows) == (plain.tokens, plain.windows)
    overlapping = evaluate_stream(model, char_tokenizer, stream, precision=FP32, stride=5)
    assert overlapping.tokens == plain.tokens and overlapping.windows > plain.windows


def test_max_tokens_scores_the_first_targets_only(model, char_tokenizer):
    ids = stream_ids(char_tokenizer, [TEXT])
    reference = chunked_nll(model, ids[:21], block=16)
    stream = text_stream(char_tokenizer, [("doc", TEXT)])
    result = evaluate_stream(model, char_tokenizer, stream, precision=FP32, max_tokens=20)
    assert result.tokens == 20 and result.bytes == 20
    assert result.loss == pytest.approx(sum(reference) / 20, rel=1e-5)


def test_text_bytes_of_multibyte_text_through_byte_level_bpe():
    docs = ["naïve café 中文字符 🙂 ok", "日本語のテキスト", "plain ascii", "ü" * 9]
    tokenizer = train_tokenizer("bpe", docs * 3, vocab_size=300)
    ids = stream_ids(tokenizer, docs)
    assert any(tokenizer.decode([i]) == "\ufffd" for i in ids)  # tokens that split characters
    stream = TokenStream([np.array(ids, dtype=np.uint32)])
    expected = sum(len(d.encode("utf-8")) for d in docs)
    assert text_bytes(tokenizer, stream, 1, len(ids)) == expected
    # Pieces that end on end-of-text tokens count the same.
    assert text_bytes(tokenizer, stream, 1, len(ids), chunk_tokens=40) == expected


def test_empty_stream_is_an_error(model, char_tokenizer):
    with pytest.raises(GptforgeError, match="nothing to evaluate"):
        evaluate_stream(model, char_tokenizer, text_stream(char_tokenizer, []), precision=FP32)


# --------------------------------------------------------------------------- multiple choice


class UnigramModel(torch.nn.Module):
    """Predicts the same distribution at every position, whatever the context."""

    def __init__(self, log_probs: torch.Tensor, block_size: int):
        super().__init__()
        self.config = SimpleNamespace(block_size=block_size)
        self.register_buffer("log_probs", log_probs)

    def forward(self, idx):
        return self.log_probs.expand(*idx.shape, -1)


def unigram(tokenizer, probs: dict[str, float]) -> torch.Tensor:
    rest = (1 - sum(probs.values())) / (tokenizer.vocab_size - len(probs))
    p = torch.full((tokenizer.vocab_size,), rest)
    for char, value in probs.items():
        p[tokenizer.encode(char)[0]] = value
    return p.log()


def test_acc_and_acc_norm_from_known_log_likelihoods(char_tokenizer):
    probs = {" ": 0.2, "a": 0.5, "b": 0.05}
    model = UnigramModel(unigram(char_tokenizer, probs), block_size=32)
    # Example 1: " b" is likelier in total, " aaaaaa" per byte (the leading space is scored
    # but, as the separator, not counted as a byte of the answer).
    # Example 2: " a" wins both ways.
    examples = [Example("xyz", (" b", " aaaaaa"), label=1, where="e1"),
                Example("hello", (" a", " b"), label=0, where="e2")]
    requests = build_requests(char_tokenizer, examples, block_size=32)
    scores = score_requests(model, requests, precision=FP32, batch_size=3,
                            pad_id=char_tokenizer.pad_id)
    log = {c: math.log(p) for c, p in probs.items()}
    expected = [log[" "] + log["b"], log[" "] + 6 * log["a"], log[" "] + log["a"],
                log[" "] + log["b"]]
    assert scores == pytest.approx(expected, rel=1e-5)
    assert [r.nbytes for r in requests] == [1, 6, 1, 1]
    result = accuracy(examples, scores, [r.nbytes for r in requests])
    assert (result.acc, result.acc_norm) == (0.5, 1.0)
    assert result.acc_stderr == pytest.approx(math.sqrt(0.25 / 2))
    assert result.acc_norm_stderr == 0.0


def test_choice_scores_match_direct_forwards_with_left_truncation(model, char_tokenizer):
    contexts = ["hi", "hello, how are you? I am", "a much longer context that will not fit: I am"]
    choices = (" fine.", " you?", " hello, how")
    examples = [Example(c, choices, 0, f"e{i}") for i, c in enumerate(contexts)]
    requests = build_requests(char_tokenizer, examples, model.config.block_size)
    scores = score_requests(model, requests, precision=FP32, batch_size=4,
                            pad_id=char_tokenizer.pad_id)
    expected = []
    for context in contexts:
        for choice in choices:
            ids = char_tokenizer.encode(context + choice)[-17:]  # block_size + 1
            n = len(choice)
            nll = target_nll(model, ids, range(len(ids) - n, len(ids)), context=16)
            expected.append(-sum(nll))
    assert scores == pytest.approx(expected, rel=1e-4)


def test_an_example_with_a_choice_longer_than_the_context_is_skipped(model, char_tokenizer):
    long = Example("x", (" a" * 10, " b"), 0, "task.jsonl:3")
    fine = [Example("hello", (" a", " b", " c"), i, f"task.jsonl:{4 + i}") for i in range(3)]
    result = evaluate_examples(model, char_tokenizer, [long, *fine], precision=FP32)
    alone = evaluate_examples(model, char_tokenizer, fine, precision=FP32)
    assert result.skipped == ("task.jsonl:3",) and result.examples == 3
    assert (result.acc, result.acc_norm) == (alone.acc, alone.acc_norm) == (1 / 3, 1 / 3)
    assert result.random_baseline == pytest.approx(1 / 3)
    assert result.to_dict()["skipped"] == 1
    with pytest.raises(GptforgeError, match=r"all 1 examples have a choice longer than the "
                                            r"model's context of 16 tokens \(the first: "
                                            r"task.jsonl:3\)"):
        evaluate_examples(model, char_tokenizer, [long], precision=FP32)


@pytest.fixture(scope="module")
def bpe():
    text = "the cats sat on the mat. the cat sat. the cats ran. " * 50
    return train_tokenizer("bpe", [text], vocab_size=300)


def test_continuation_is_the_tail_of_the_whole_texts_tokens(bpe):
    whole, context = bpe.encode("the cats sat."), bpe.encode("the cats")
    assert whole[:len(context)] == context
    split = split_continuation(bpe, "the cats", " sat.")
    assert split.context_ids == context and split.context_ids + split.ids == whole
    # Trailing whitespace of the context moves to the continuation, where BPE attaches it.
    moved = split_continuation(bpe, "the cats ", "sat.")
    assert moved == split and moved.nbytes == len("sat.")


def test_a_merge_across_the_boundary_encodes_the_parts_separately(bpe):
    whole, context = bpe.encode("the cats sat."), bpe.encode("the cat")
    assert whole[:len(context)] != context  # " cats" is one token
    split = split_continuation(bpe, "the cat", "s sat.")
    assert split.context_ids == context and split.ids == bpe.encode("s sat.")
    assert bpe.decode(split.ids) == "s sat." and split.nbytes == 6


def test_empty_context_starts_a_document(char_tokenizer):
    split = split_continuation(char_tokenizer, "", "hi")
    assert split.context_ids == [char_tokenizer.eos_id]
    assert split.ids == char_tokenizer.encode("hi")


# --------------------------------------------------------------------------- task files


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_native_records_and_max_examples(tmp_path):
    records = [{"context": "2 + 2 =", "choices": [" 4", " 5"], "label": 0},
               {"context": "", "choices": ["a", "b", "c"], "label": 2}]
    path = write_jsonl(tmp_path / "t.jsonl", records)
    examples = read_task(path)
    assert examples[0] == Example("2 + 2 =", (" 4", " 5"), 0, f"{path}:1")
    assert examples[1].label == 2 and examples[1].where == f"{path}:2"
    assert len(read_task(path, max_examples=1)) == 1


def test_hellaswag_layout(tmp_path):
    # Rowan/hellaswag rows: the label is a string; WikiHow rows carry [header]/[title] markup.
    records = [
        {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a "
         "roof.", "ctx_b": "he", "ctx": "A man is sitting on a roof. he",
         "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                     "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
         "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val", "split_type": "indomain",
         "label": "3"},
        {"ind": 7, "activity_label": "Home and Garden", "ctx_a": "[header] How to keep a cat "
         "off the table [title] Put tape on the table.", "ctx_b": "", "ctx": "...",
         "endings": ["Cats  dislike the [substeps] sticky feel.", "Tables are tall."],
         "source_id": "wikihow~1", "split": "val", "split_type": "zeroshot", "label": 0},
    ]
    first, second = read_task(write_jsonl(tmp_path / "h.jsonl", records), "hellaswag")
    assert first.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert first.choices[3] == " starts pulling up roofing on a roof." and first.label == 3
    assert second.context == ("Home and Garden: How to keep a cat off the table. Put tape on "
                              "the table.")
    assert second.choices == (" Cats dislike the sticky feel.", " Tables are tall.")


def test_arc_layout(tmp_path):
    records = [
        {"id": "Mercury_7175875", "question": "Which is a mixture?",
         "choices": {"text": ["salt", "sugar", "salt water", "water"],
                     "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
        {"id": "NYSEDREGENTS_2015_4_8", "question": "Which is a gas?",
         "choices": {"text": ["ice", "steam", "rock"], "label": ["1", "2", "3"]},
         "answerKey": "2"},
    ]
    first, second = read_task(write_jsonl(tmp_path / "a.jsonl", records), "arc")
    assert first.context == "Question: Which is a mixture?\nAnswer:"
    assert first.choices == (" salt", " sugar", " salt water", " water") and first.label == 2
    assert second.label == 1 and len(second.choices) == 3


def test_piqa_layout(tmp_path):
    records = [{"goal": "To open a jar,", "sol1": "twist the lid.", "sol2": "eat the lid.",
                "label": 0}]
    (example,) = read_task(write_jsonl(tmp_path / "p.jsonl", records), "piqa")
    assert example == Example("Question: To open a jar,\nAnswer:",
                              (" twist the lid.", " eat the lid."), 0, f"{tmp_path}/p.jsonl:1")


def test_hf_task_from_a_local_dataset_directory(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "piqa"
    folder.mkdir()
    write_jsonl(folder / "validation.jsonl",
                [{"goal": "g", "sol1": "a", "sol2": "b", "label": 1}] * 3)
    examples = read_task(f"hf:{folder}@validation", "piqa")
    assert len(examples) == 3 and examples[0].label == 1
    assert examples[2].where == f"hf:{folder}@validation row 2"


@pytest.mark.parametrize("records, task_format, message", [
    ([{"context": "c", "choices": [" a", " b"], "label": 2}], "mc",
     r"t.jsonl:1: label 2 is out of range for 2 choices \(0..1\)"),
    ([{"context": "c", "choices": [" a"], "label": 0}], "mc", "t.jsonl:1: 1 choice"),
    ([{"context": "c", "choices": [" a", ""], "label": 0}], "mc", "choice 1 is an empty"),
    ([{"context": "c", "label": 0}], "mc", "t.jsonl:1: no field 'choices'"),
    ([{"context": "c", "choices": " a", "label": 0}], "mc", "must be an array of strings"),
    ([{"context": "c", "choices": [" a", " b"], "label": True}], "mc", "not a choice index"),
    ([["c", " a", " b"]], "mc", "t.jsonl:1: expected a JSON object, got an array"),
    ([{"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["x", "y"],
       "label": ""}], "hellaswag", "no answer .* evaluate a validation split"),
    ([{"goal": "g", "sol1": "a", "sol2": "b", "label": -1}], "piqa", "no answer"),
    ([{"question": "q", "choices": {"text": ["x", "y"], "label": ["A", "B"]},
       "answerKey": "E"}], "arc", "answerKey 'E' is not one of"),
    ([{"context": "c", "choices": [" a", " b"], "label": 0}], "hellaswag", "no field 'ctx_a'"),
])
def test_bad_records_name_the_line(tmp_path, records, task_format, message):
    path = write_jsonl(tmp_path / "t.jsonl", records)
    with pytest.raises(GptforgeError, match=message):
        read_task(path, task_format)


def test_bad_task_files(tmp_path):
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"context": "c", "choices": [" a", " b"], "label": 0}\n{"context": \n')
    with pytest.raises(GptforgeError, match=r"t.jsonl:2: invalid JSON"):
        read_task(str(bad))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(GptforgeError, match="holds no examples"):
        read_task(str(tmp_path / "empty.jsonl"))
    with pytest.raises(GptforgeError, match="no such task file"):
        read_task(str(tmp_path / "missing.jsonl"))
    (tmp_path / "t.json").write_text("[]")
    with pytest.raises(GptforgeError, match="must be JSONL"):
        read_task(str(tmp_path / "t.json"))
    with pytest.raises(GptforgeError, match="name the split"):
        read_task("hf:Rowan/hellaswag", "hellaswag")
