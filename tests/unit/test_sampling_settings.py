"""The one definition of the sampling settings, and OpenAI's frequency and presence penalties.

Facts checked: the penalties are OpenAI's formula (a hand computation on fixed logits; the
engine's greedy output equals a plain loop that applies the formula to the model's logits, with
only generated tokens counted, row by row); with logits spread less than 2 apart, a presence
penalty of 2 forbids every repeat; every field is an option of ``generate`` and ``chat`` with its
docstring as help; values out of range are refused in the caller's names.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections import Counter

import pytest
import torch

import gptforge
from gptforge.cli import main
from gptforge.config.reference import field_docs
from gptforge.errors import GptforgeError
from gptforge.inference.engine import Engine
from gptforge.inference.sampling import (
    SamplingSettings,
    SettingError,
    add_sampling_options,
    apply_frequency_presence_penalty,
    replace_setting,
    settings_from_args,
    settings_from_kwargs,
)
from gptforge.model import GPT, ModelConfig
from tests.tiny_checkpoints import make_base


def test_penalties_are_openais_formula_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5],
                           [1.0, 2.0, 3.0, 0.5]])
    counts = torch.tensor([[0.0, 2.0, 1.0, 0.0],
                           [3.0, 0.0, 0.0, 1.0]])
    out = apply_frequency_presence_penalty(logits, counts, 0.5, 0.25)
    # logit - count * 0.5 - (count > 0) * 0.25, worked out by hand:
    assert out.tolist() == [[1.0, 2.0 - 1.0 - 0.25, 3.0 - 0.5 - 0.25, 0.5],
                            [1.0 - 1.5 - 0.25, 2.0, 3.0, 0.5 - 0.5 - 0.25]]
    negative = apply_frequency_presence_penalty(logits, counts, -1.0, -2.0)  # encourage repeats
    assert negative[0].tolist() == [1.0, 6.0, 6.0, 0.5]
    assert apply_frequency_presence_penalty(logits, counts, 0.0, 0.0) is logits


def tiny_model(init_std: float) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=40, n_layer=2, n_head=2, n_embd=32, block_size=32,
                           init_std=init_std)).eval()


@torch.no_grad()
def greedy_by_hand(model: GPT, prompt: list[int], steps: int, frequency: float,
                   presence: float, count_prompt: bool = False) -> list[int]:
    """Greedy decoding without a cache, the penalty applied as OpenAI writes it (counting the
    completion's tokens only, unless ``count_prompt``)."""
    ids, out = list(prompt), []
    for _ in range(steps):
        logits = model(torch.tensor([ids]))[0, -1, :40].float()  # without padding rows
        for token, count in Counter(ids if count_prompt else out).items():
            logits[token] -= count * frequency + presence
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


def test_the_engine_penalises_generated_tokens_per_row():
    model = tiny_model(0.3)
    engine = Engine(model)
    plain = greedy_by_hand(model, [1, 2, 3], 20, 0.0, 0.0)
    prompt = [1, 2, 3] + plain[:6]  # tokens the model goes on to pick: they must not count
    settings = SamplingSettings(max_new_tokens=14, temperature=0, frequency_penalty=1.5,
                                presence_penalty=0.5)
    rows = torch.stack(list(engine.generate(prompt, settings, num_samples=2)), dim=1).tolist()
    expected = greedy_by_hand(model, prompt, 14, 1.5, 0.5)
    assert rows == [expected, expected]  # each row counts its own tokens
    # Real comparisons: the penalty changes the text, and counting the prompt would too.
    assert expected != plain[6:20]
    assert expected != greedy_by_hand(model, prompt, 14, 1.5, 0.5, count_prompt=True)


def test_a_presence_penalty_stops_a_greedy_repetition():
    model = tiny_model(0.02)  # small weights: logits within 2 of each other
    engine = Engine(model)

    def greedy(**penalties) -> list[int]:
        settings = SamplingSettings(max_new_tokens=16, temperature=0, **penalties)
        return [int(step) for step in engine.generate([1, 2, 3], settings)]

    assert max(Counter(greedy()).values()) >= 3  # it repeats without the penalty
    for penalties in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
        out = greedy(**penalties)
        assert len(set(out)) == len(out), (penalties, out)  # and never with it


@pytest.mark.parametrize("field, value, words", [
    ("frequency_penalty", 2.5, "<= 2"), ("frequency_penalty", -2.01, ">= -2"),
    ("presence_penalty", float("nan"), "finite number"), ("top_p", 1.5, "<= 1"),
    ("top_k", -1, ">= 0"), ("max_new_tokens", 2.0, "integer"), ("seed", 2**64, "<="),
])
def test_ranges_are_refused_naming_the_field(field, value, words):
    with pytest.raises(SettingError) as err:
        SamplingSettings(**{field: value})
    assert err.value.name == field and str(err.value).startswith(field) and words in str(err.value)


def test_python_api_keywords_are_the_fields(tmp_path):
    ckpt = make_base(tmp_path, init_std=0.3)[0]
    generator = gptforge.load(ckpt, device="cpu")
    with pytest.raises(GptforgeError, match="did you mean temperature"):
        generator.generate("hello", temprature=0)
    with pytest.raises(GptforgeError, match="presence_penalty must be >= -2"):
        generator.generate("hello", presence_penalty=-3)
    assert settings_from_kwargs(top_k=5) == SamplingSettings(top_k=5)


def test_every_field_is_an_option_with_its_docstring():
    parser = argparse.ArgumentParser()
    add_sampling_options(parser, temperature=0.8)
    docs = field_docs(SamplingSettings)
    helps = {a.dest: a.help for a in parser._actions}
    assert set(docs) == set(SamplingSettings.__dataclass_fields__) and all(docs.values())
    for name, doc in docs.items():
        assert helps[name].startswith(doc)
    args = parser.parse_args(["--frequency-penalty", "1.5", "--seed", "3"])
    assert settings_from_args(args) == SamplingSettings(temperature=0.8, frequency_penalty=1.5,
                                                        seed=3)
    with pytest.raises(GptforgeError, match="^--presence-penalty must be >= -2 and <= 2"):
        settings_from_args(parser.parse_args(["--presence-penalty", "3"]))


def test_replace_setting_parses_by_type():
    settings = SamplingSettings(seed=1)
    assert replace_setting(settings, "top_k", "40").top_k == 40
    assert replace_setting(settings, "seed", "none").seed is None
    with pytest.raises(SettingError, match="top_k must be an integer"):
        replace_setting(settings, "top_k", "0.5")
    with pytest.raises(GptforgeError, match="did you mean top_p"):
        replace_setting(settings, "top-p", "0.5")


def test_generate_cli_penalties_are_the_apis(tmp_path, capsys):
    ckpt = make_base(tmp_path, init_std=0.3)[0]
    flags = ["--max-new-tokens", "12", "--temperature", "0"]
    assert main(["generate", str(ckpt), "--device", "cpu", "--prompt", "hello", *flags,
                 "--frequency-penalty", "2", "--presence-penalty", "1"]) == 0
    out = capsys.readouterr().out
    generator = gptforge.load(ckpt, device="cpu")
    expected = generator.generate("hello", max_new_tokens=12, temperature=0,
                                  frequency_penalty=2.0, presence_penalty=1.0)
    assert out == "hello" + expected + "\n"
    assert expected != generator.generate("hello", max_new_tokens=12, temperature=0)


def test_chat_cli_penalties_are_the_apis(tmp_path, capsys, monkeypatch):
    ckpt = make_base(tmp_path, init_std=0.3)[0]
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(["chat", str(ckpt), "--device", "cpu", "--max-new-tokens", "10",
                 "--temperature", "0", "--presence-penalty", "2"]) == 0
    reply = gptforge.load(ckpt, device="cpu").chat(
        [{"role": "user", "content": "hello"}], max_new_tokens=10, temperature=0,
        presence_penalty=2.0)
    assert capsys.readouterr().out == f"assistant> {reply}\n"
