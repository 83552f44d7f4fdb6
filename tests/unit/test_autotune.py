"""train/autotune.py: the fastest candidate is chosen, cached, and failures fall back."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

from gptforge.cli import main
from gptforge.config.loader import load_config
from gptforge.config.schema import Config
from gptforge.model.config import ModelConfig
from gptforge.model.gpt import GPT
from gptforge.runtime.distributed import DistInfo
from gptforge.train import autotune
from gptforge.train.autotune import Candidate
from tests.conftest import prepare_corpus

CPU = torch.device("cpu")


def config(**runtime) -> Config:
    model = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    cfg = Config(model=model)
    return dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, **runtime),
                               train=dataclasses.replace(cfg.train, batch_size=2))


@pytest.fixture
def small(monkeypatch):
    """A tiny model that counts as worth timing."""
    monkeypatch.setattr(autotune, "MIN_PARAMS", 0)
    return GPT(config().model)


class FakeTimer:
    """Seconds per step from a table (by label); raises for labels missing from it."""

    def __init__(self, seconds: dict[str, float]):
        self.seconds, self.calls = seconds, []

    def __call__(self, candidate: Candidate, left: float) -> float:
        self.calls.append(candidate.label)
        if candidate.label not in self.seconds:
            raise RuntimeError(f"{candidate.label} cannot run here")
        return self.seconds[candidate.label]


TIMES = {"float32": 0.030, "bfloat16 autocast": 0.020,
         "bfloat16 autocast, float32 attention": 0.025}


def test_candidates_on_cpu_cover_both_dtypes_and_attention_default_first():
    options = autotune.candidates(config(), CPU)
    assert {c.label for c in options} == set(TIMES)
    assert options[0] == autotune.default_candidate(config(), CPU)
    fixed = autotune.candidates(config(dtype="float32", compile="auto"), CPU)
    assert [c.label for c in fixed] == ["float32", "float32, compiled"]


def test_the_fastest_candidate_is_chosen_and_cached(small, tmp_path):
    path = tmp_path / "autotune.json"
    timer = FakeTimer(TIMES)
    choice = autotune.decide(config(), small, CPU, timer=timer, path=path)
    assert choice.candidate == Candidate("bfloat16") and choice.source == "measured"
    assert sorted(timer.calls) == sorted(TIMES) and choice.seconds_per_step == TIMES
    # A second start takes the cached answer without timing anything.
    again = FakeTimer({})
    cached = autotune.decide(config(), small, CPU, timer=again, path=path)
    assert again.calls == [] and cached.source == "cached"
    assert cached.candidate == choice.candidate
    # Slower bf16 elsewhere: the flags do not decide.
    other = autotune.decide(config(), small, CPU, timer=FakeTimer({**TIMES, "float32": 0.01}),
                            path=tmp_path / "other.json")
    assert other.candidate == Candidate("float32")


def test_cache_key_includes_torch_version_and_shapes(small, monkeypatch):
    options = autotune.candidates(config(), CPU)
    key = autotune.cache_key(config(), CPU, options)
    wider = dataclasses.replace(config(), train=dataclasses.replace(config().train, batch_size=4))
    assert autotune.cache_key(wider, CPU, options) != key
    deeper = dataclasses.replace(config(), model=dataclasses.replace(config().model, n_layer=3))
    assert autotune.cache_key(deeper, CPU, options) != key
    monkeypatch.setattr(torch, "__version__", "9.99.0")
    assert autotune.cache_key(config(), CPU, options) != key


def test_a_cache_of_another_shape_is_a_miss(small, tmp_path):
    path = tmp_path / "autotune.json"
    autotune.decide(config(), small, CPU, timer=FakeTimer(TIMES), path=path)
    wider = dataclasses.replace(config(), train=dataclasses.replace(config().train, batch_size=4))
    timer = FakeTimer(TIMES)
    assert autotune.decide(wider, small, CPU, timer=timer, path=path).source == "measured"
    assert len(timer.calls) == 3 and len(json.loads(path.read_text())["entries"]) == 2


def test_a_corrupt_cache_is_ignored_with_a_warning_and_rewritten(small, tmp_path, caplog):
    path = tmp_path / "autotune.json"
    path.write_text('{"entries": {"abc": ')
    timer = FakeTimer(TIMES)
    with caplog.at_level(logging.WARNING, logger="gptforge"):
        choice = autotune.decide(config(), small, CPU, timer=timer, path=path)
    assert "ignoring the autotune cache" in caplog.text and choice.source == "measured"
    assert len(json.loads(path.read_text())["entries"]) == 1


def test_a_failing_candidate_is_skipped_and_all_failing_gives_the_default(small, tmp_path,
                                                                          caplog):
    with caplog.at_level(logging.INFO, logger="gptforge"):
        choice = autotune.decide(config(), small, CPU, path=tmp_path / "a.json",
                                 timer=FakeTimer({"float32": 0.03, "bfloat16 autocast": 0.05}))
    assert choice.candidate == Candidate("float32")
    assert "float32 attention skipped (RuntimeError" in caplog.text
    none = autotune.decide(config(), small, CPU, timer=FakeTimer({}), path=tmp_path / "b.json")
    assert none.source == "default" and none.candidate == autotune.default_candidate(config(),
                                                                                     CPU)
    assert not (tmp_path / "b.json").exists()  # nothing measured, nothing cached


def test_the_budget_stops_timing_and_a_partial_answer_is_not_cached(small, tmp_path):
    clock = iter(range(0, 1000, 10)).__next__  # every reading 10 s later
    results, complete = autotune.measure(autotune.candidates(config(), CPU), FakeTimer(TIMES),
                                         budget=15, clock=clock)
    assert len(results) == 1 and not complete


def test_tiny_models_and_fixed_settings_are_not_timed(tmp_path):
    timer = FakeTimer(TIMES)
    tiny = autotune.decide(config(), GPT(config().model), CPU, timer=timer, path=tmp_path / "c")
    assert tiny.source == "default" and "too small" in tiny.reason
    fixed = autotune.decide(config(dtype="float32"), GPT(config().model), CPU, timer=timer,
                            path=tmp_path / "c")
    assert fixed.candidate == Candidate("float32") and timer.calls == []


def test_real_timing_leaves_the_model_and_the_random_streams_alone(small, tmp_path):
    before = {k: v.clone() for k, v in small.state_dict().items()}
    rng = torch.get_rng_state()
    choice = autotune.choose(config(), small, CPU, DistInfo())
    assert choice.source == "measured" and all(s > 0 for s in choice.seconds_per_step.values())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in small.state_dict().items())


def test_the_choice_is_printed_and_saved_with_the_run(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(autotune, "MIN_PARAMS", 0)
    monkeypatch.setattr(autotune, "time_training_step",
                        lambda cfg, model, device, c, left: TIMES[c.label])
    data = prepare_corpus(tmp_path, 60)
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="gptforge"):
        assert main(["train", "-c", "tiny", f"data.dir={data}", f"train.out_dir={run}",
                     "runtime.dtype=auto", "train.max_steps=2", "train.sample_tokens=0",
                     "runtime.progress=false", "runtime.device=cpu"]) == 0
    assert "runtime: bfloat16 autocast (measured" in caplog.text
    saved = json.loads((run / "runtime_choice.json").read_text())
    assert saved["candidate"]["dtype"] == "bfloat16" and saved["source"] == "measured"
    text = (run / "config.toml").read_text()
    assert "#   bfloat16 autocast: 20.0 ms/step" in text
    assert load_config(str(run / "config.toml"), []).runtime.dtype == "auto"  # still loads
