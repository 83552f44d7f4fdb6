"""``gptforge generate`` and ``gptforge chat`` at the edges: sampling options no sampling can
mean are one-line errors, a tiny temperature is greedy decoding, an interrupted sample still
ends its line, and chat says when the model was never fine-tuned for chat."""

from __future__ import annotations

import io
import logging
import sys

import pytest
import torch

from gptforge.cli import main
from gptforge.config.schema import Config
from gptforge.inference.textgen import TextGenerator
from gptforge.model import GPT
from gptforge.train.finetune import SupervisedFinetuning
from tests.tiny_checkpoints import make_base, make_lora_checkpoint, save_model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("cli"), init_std=0.3)  # varied greedy text


def generate(ckpt, *flags) -> list[str]:
    return ["generate", str(ckpt), "--device", "cpu", "--prompt", "hello",
            "--max-new-tokens", "12", "--seed", "0", *flags]


@pytest.mark.parametrize("flags, words", [
    (["--temperature", "nan"], "--temperature must be a finite number, got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number, got inf"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-p", "nan"], "--top-p must be a finite number"),
    (["--repetition-penalty", "1e400"], "--repetition-penalty must be a finite number"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
])
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_impossible_sampling_options_are_one_line(base, command, flags, words, capsys,
                                                  monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    args = generate(base[0], *flags) if command == "generate" else \
        ["chat", str(base[0]), "--device", "cpu", *flags]
    assert main(args) == 1
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith(f"error: {words}"), err


def test_a_tiny_temperature_generates_the_greedy_text(base, capsys):
    assert main(generate(base[0], "--temperature", "0")) == 0
    greedy = capsys.readouterr().out
    assert len(set(greedy)) > 4  # a varied text: a real comparison
    for temperature in ("1e-40", "1e-300"):
        assert main(generate(base[0], "--temperature", temperature)) == 0
        assert capsys.readouterr().out == greedy
    assert main(generate(base[0], "--temperature", "1e-300", "--repetition-penalty",
                         "1e-300")) == 0
    out = capsys.readouterr().out
    assert out.startswith("hello") and out.endswith("\n")


def test_an_interrupted_sample_still_ends_its_line(base, capsys, monkeypatch):
    def stream_then_ctrl_c(self, prompt, **kwargs):
        yield " world"
        raise KeyboardInterrupt

    monkeypatch.setattr(TextGenerator, "stream", stream_then_ctrl_c)
    assert main(generate(base[0])) == 130
    out, err = capsys.readouterr()
    assert out == "hello world\n" and err == "interrupted\n"


def chat_warnings(ckpt, caplog, monkeypatch) -> list[str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gptforge"):
        assert main(["chat", str(ckpt), "--device", "cpu", "--max-new-tokens", "3"]) == 0
    return [r.getMessage() for r in caplog.records if "fine-tuned for chat" in r.getMessage()]


def test_chat_warns_about_a_model_that_was_only_pretrained(base, tmp_path, caplog, monkeypatch):
    ckpt, model, tokenizer = base
    (warning,) = chat_warnings(ckpt.parent.parent, caplog, monkeypatch)  # the run directory
    assert warning.startswith(f"warning: {ckpt} has not been fine-tuned for chat")
    # What SFT and DPO write into model.json (LoRA runs too) silences it.
    extras = SupervisedFinetuning().checkpoint_extras(Config(), model)[1]
    assert extras == {"fine_tuned": "sft", "chat_template": "gptforge"}
    tuned = save_model(tmp_path / "sft", model, tokenizer, ckpt / "tokenizer", extra_meta=extras)
    assert chat_warnings(tuned, caplog, monkeypatch) == []
    torch.manual_seed(0)
    lora_model = GPT(model.config)
    lora = make_lora_checkpoint(tmp_path, ckpt, lora_model, tokenizer)
    assert chat_warnings(lora, caplog, monkeypatch) == []
