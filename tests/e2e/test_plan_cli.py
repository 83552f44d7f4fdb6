"""`gptforge plan` as a user runs it: the counts of the model it would train, a measured step, a
micro-batch suggestion that is the largest fitting one, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from gptforge.cli import main
from gptforge.config.loader import load_config
from gptforge.model.gpt import GPT
from gptforge.runtime import memory
from gptforge.train.optim import build_optimizer
from tests.conftest import prepare_corpus


@pytest.mark.slow
def test_plan_of_the_tiny_preset(tmp_path, capsys):
    data = prepare_corpus(tmp_path, 200)
    capsys.readouterr()  # prepare's report
    overrides = [f"data.dir={data}", "train.global_batch_tokens=1024", "runtime.device=cpu"]
    budget_gb = 0.004
    assert main(["plan", "-c", "tiny", *overrides, "--steps", "2", "--memory-gb", str(budget_gb),
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)

    cfg = load_config("tiny", overrides)
    vocab = json.loads((data / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    model = GPT(type(cfg.model)(**{**cfg.model.to_dict(), "vocab_size": vocab}))
    assert plan["params"] == model.num_params()
    assert plan["flops_per_token"] == model.flops_per_token()
    assert plan["tokens_per_step"] == 1024 and plan["grad_accum"] == 1024 // (4 * 32)
    measured = plan["measurement"]
    assert measured["tokens_per_sec"] > 0 and 0 < measured["mfu"] < 1
    # The estimate against the step the plan ran, its tensors followed one by one.
    assert 0.8 <= plan["memory"]["total"] / measured["peak_bytes"] <= 1.2

    # The suggestion is the largest micro-batch whose estimate fits 90% of the budget.
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    def total(b):
        return memory.estimate(model, optimizer, model.config, b, 32, 4).total()
    s = plan["suggestion"]
    limit = budget_gb * 1e9 * 0.9
    assert total(s["largest_batch"]) <= limit < total(s["largest_batch"] + 1)
    assert s["batch_size"] * s["grad_accum"] * 32 == 1024 and s["batch_size"] <= s["largest_batch"]
    assert [row["gpu"] for row in plan["gpus"]][:2] == ["A100 80GB", "H100 80GB"]


def test_plan_text_without_measuring(capsys):
    assert main(["plan", "-c", "tiny", "model.vocab_size=100", "--steps", "0"]) == 0
    out = capsys.readouterr().out
    for expected in ("parameters", "FLOPs per token", "optimizer state", "activations",
                     "with activation checkpointing", "not measured (--steps 0)", "H100 80GB",
                     "assumed MFU 40%"):
        assert expected in out, expected


@pytest.mark.parametrize("args, expected", [
    (["--mfu", "2"], "--mfu must be above 0 and at most 1"),
    (["--memory-gb", "0"], "--memory-gb must be positive"),
    (["data.dir=/nonexistent/x"], "model.vocab_size is 0"),
    (["model.vocab_size=100", "train.batch_size=auto"], "give a number to plan for"),
])
def test_bad_plan_input_gives_one_line(args, expected, capsys):
    code = main(["plan", "-c", "tiny", "--steps", "0", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and expected in err[0], err
