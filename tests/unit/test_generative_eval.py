"""Generative evaluation: answer extraction, pass@k against its binomial definition, text metrics
counted by hand, and generation against a direct greedy loop over the model's forward."""

from __future__ import annotations

import math

import pytest
import torch

from gptforge.errors import GptforgeError
from gptforge.eval.generative import (
    GenExample,
    GenSettings,
    Shot,
    cut_at_stop,
    evaluate_generative,
    extract_answer,
    generate_texts,
    pass_at_k,
    prompt_ids_of,
)
from gptforge.eval.text_metrics import distinct_n, repetition_rate, text_metrics
from gptforge.inference.textgen import TextGenerator
from gptforge.model import GPT
from gptforge.runtime.device import Precision
from gptforge.tokenizer.chat_template import render_prompt
from tests.tiny_checkpoints import make_tokenizer, tiny_config

FP32 = Precision(torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("text, how, expected", [
    ("3 + 2 = <<3+2=5>>5 apples\n#### 5", "number", "5"),
    ("so the total is 1,234 and then #### 1,234.", "number", "1234"),
    ("#### -7", "number", "-7"),
    ("She pays $12.50, then 3 more: 15.", "number", "15"),  # no marker: the last number
    ("it costs $1,000.00", "number", "1000"),
    ("2.5 hours", "number", "2.5"),
    ("no digits here", "number", None),
    ("  The  Eiffel tower.\n", "text", "the eiffel tower"),
    ("1,000 people", "text", "1000 people"),
])
def test_answer_extraction(text, how, expected):
    assert extract_answer(text, how) == expected


def test_pass_at_k_is_one_minus_the_binomial_ratio():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert pass_at_k(200, 1, 1) == pytest.approx(1 / 200)


def test_distinct_n_and_repetition_counted_by_hand():
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # ab, ba, ab
    # 4-grams of "a b c a b c a b c": abca bcab cabc abca bcab cabc: 3 unique of 6.
    assert repetition_rate(["a b c a b c a b c", "one two three four"]) == pytest.approx(0.25)
    assert repetition_rate(["too short"]) is None
    # CJK characters are words of their own; punctuation marks too.
    assert distinct_n(["你好你好!"], 1) == pytest.approx(3 / 5)


def test_bleu_and_chrf_of_a_perfect_and_a_looping_answer():
    pytest.importorskip("sacrebleu")
    perfect = text_metrics([["the cat sat on the mat"]], [["the cat sat on the mat"]])
    assert perfect["bleu"] == pytest.approx(100) and perfect["chrf"] == pytest.approx(100)
    looping = text_metrics([["the cat the cat the cat the cat"]], [["the cat sat on the mat"]])
    assert looping["bleu"] < 20 and looping["repetition_4"] > 0.5
    # Examples with different numbers of references.
    mixed = text_metrics([["a b c d"], ["x y z w"]], [["a b c d", "q"], ["x y z w"]])
    assert mixed["bleu"] == pytest.approx(100)


def test_cut_at_stop():
    assert cut_at_stop("abc\n\nQuestion: x", ["Question:", "\n\n"]) == ("abc", True)
    assert cut_at_stop("abc", ["zz"]) == ("abc", False)


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    tokenizer = make_tokenizer(tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    model = GPT(tiny_config(tokenizer.vocab_size, block_size=64, init_std=0.3)).eval()
    return TextGenerator(model, tokenizer)


@torch.no_grad()
def greedy_reference(generator, prompt: str, steps: int) -> str:
    """Greedy decoding by a full forward per token, stopping at end of text."""
    ids = generator.tokenizer.encode(prompt)
    out = []
    for _ in range(steps):
        logits = generator.model(torch.tensor([ids]))[0, -1]
        token = int(logits[:generator.tokenizer.vocab_size].argmax())  # no padding rows
        if token == generator.tokenizer.eos_id:
            break
        ids.append(token)
        out.append(token)
    return generator.tokenizer.decode(out)


def test_greedy_generation_matches_a_direct_loop_and_stops(generator):
    reference = greedy_reference(generator, "hello, how", 20)
    settings = GenSettings(max_new_tokens=20)
    ids, stops, _ = prompt_ids_of(generator, GenExample("hello, how", ("x",)), [], settings)
    assert generate_texts(generator, ids, settings, stop_ids=stops) == [reference]
    assert len(reference) >= 6  # the random model writes something to cut
    stop = reference[4:6]
    cut = generate_texts(generator, ids, GenSettings(max_new_tokens=20, stop=(stop,)),
                         stop_ids=stops)
    assert cut == [reference[:reference.index(stop)]]


def test_samples_are_reproducible_and_differ(generator):
    settings = GenSettings(num_samples=4, temperature=1.0, max_new_tokens=12)
    ids = generator.encode_prompt("hi")
    first = generate_texts(generator, ids, settings, stop_ids=[0], seed=3)
    assert first == generate_texts(generator, ids, settings, stop_ids=[0], seed=3)
    assert len(set(first)) > 1


def test_chat_prompt_is_the_chat_template_with_shots_as_turns(generator):
    tokenizer = generator.tokenizer
    settings = GenSettings(chat=True, max_new_tokens=8)
    example = GenExample("how are you?", ("fine",))
    ids, stops, banned = prompt_ids_of(generator, example, [Shot("hi", " hello.")], settings)
    assert ids == render_prompt(tokenizer, [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "hello."},
                                            {"role": "user", "content": "how are you?"}])
    assert stops == [tokenizer.special_tokens["<|end|>"], tokenizer.eos_id]
    assert tokenizer.special_tokens["<|user|>"] in banned
    plain, _, _ = prompt_ids_of(generator, example, [Shot("hi", " hello.")],
                                GenSettings(max_new_tokens=8))
    assert tokenizer.decode(plain) == "hi hello.\n\nhow are you?"


def test_exact_match_and_pass_at_k_of_a_model(generator):
    prompts = ["hello, how", "I am"]
    outputs = [greedy_reference(generator, p, 10) for p in prompts]
    examples = [GenExample(prompts[0], (outputs[0],), "e1"),
                GenExample(prompts[1], ("not what it says",), "e2")]
    result = evaluate_generative(generator.model, generator.tokenizer, examples, [],
                                 GenSettings(max_new_tokens=10, pass_k=(1,)), precision=FP32)
    assert (result.exact_match, result.pass_at["1"]) == (0.5, 0.5)
    assert result.samples[0]["output"] == outputs[0] and result.samples[0]["correct"]
    assert result.metrics["distinct_1"] is not None
    many = evaluate_generative(generator.model, generator.tokenizer, examples[:1], [],
                               GenSettings(num_samples=5, temperature=1.5, max_new_tokens=10,
                                           pass_k=(1, 5)), precision=FP32)
    assert 0 <= many.pass_at["1"] <= many.pass_at["5"] <= 1


@pytest.mark.parametrize("settings, message", [
    (dict(num_samples=3), "temperature 0 would all be the same"),
    (dict(num_samples=2, temperature=1.0, pass_k=(5,)), "pass@5 needs at least 5 samples"),
    (dict(extract="regex"), "unknown answer extraction"),
])
def test_bad_generation_settings(settings, message):
    with pytest.raises(GptforgeError, match=message):
        GenSettings(**settings)
