"""Reasoning and tool calls end to end. SFT on such conversations lowers the loss and records the
chat template; DPO reads two whole conversations. The reply path is checked with a model whose
engine emits a scripted turn (what a model trained on the template writes), through
``.chat()``, the ``chat`` REPL and ``serve``: the reasoning and the tool call come back apart."""

from __future__ import annotations

import io
import json
import sys
import threading

import pytest
import torch

import gptforge
from gptforge.checkpoints.format import read_meta, resolve_checkpoint
from gptforge.cli import main
from gptforge.inference.textgen import TextGenerator
from gptforge.metrics.sinks import read_metrics
from gptforge.model import GPT
from gptforge.serve.server import ModelServer
from gptforge.tokenizer import train_tokenizer
from gptforge.tokenizer.chat_template import CHATML, DEFAULT
from tests.e2e.test_serve import call, events
from tests.tiny_checkpoints import save_model, tiny_config

QUIET = ["runtime.progress=false", "runtime.device=cpu", "runtime.dtype=float32",
         "runtime.tensorboard=false", "train.sample_tokens=0", "finetune.val_fraction=0",
         "train.eval_interval=1000"]
TOOL = {"type": "function", "function": {"name": "wx"}}
CALL = {"type": "function", "function": {"name": "wx", "arguments": '{"c": "p"}'}}
WEATHER = {"tools": [TOOL], "messages": [
    {"role": "user", "content": "wx?"},
    {"role": "assistant", "content": "", "reasoning": "tool", "tool_calls": [CALL]}]}
HI = {"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "hello!", "reasoning": "greet"}]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("reasoning")
    markers = "<think></think><tool_call></tool_call><tools>\n|_im_start end system"
    text = json.dumps([WEATHER, HI]) + markers
    tokenizer = train_tokenizer("char", [text])
    tokenizer.save(root / "tokenizer")
    torch.manual_seed(0)
    model = GPT(tiny_config(tokenizer.vocab_size, block_size=200))
    return save_model(root / "base", model, tokenizer, root / "tokenizer")


class ScriptedEngine:
    """Stands in for the engine: every generation emits ``turn`` (as a model trained on the
    template writes it) and then the end of the turn."""

    def __init__(self, tokenizer, turn: dict):
        learned = "".join(s.text for s in DEFAULT.segments([turn]) if s.learn)
        self.ids = tokenizer.encode(learned)  # ends with <|end|>, one id

    def new_cache(self):
        return None

    def generate(self, prompt, settings, *, num_samples=1, cache=None, **_):
        for token in self.ids[:settings.max_new_tokens]:
            yield torch.full((num_samples,), token)


def scripted(base, turn: dict) -> TextGenerator:
    generator = gptforge.load(base, device="cpu")
    generator.engine = ScriptedEngine(generator.tokenizer, turn)
    return generator


@pytest.mark.slow
def test_sft_on_reasoning_and_tool_calls_then_dpo_on_two_conversations(base, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [WEATHER, HI])
    out = tmp_path / "sft"
    assert main(["sft", f"init_from={base}", f"finetune.data={data}", f"train.out_dir={out}",
                 "train.max_steps=20", "train.batch_size=2", "optim.lr=1e-2",
                 "train.log_interval=1", "schedule.warmup_steps=2",
                 "finetune.chat_template=gptforge", *QUIET]) == 0
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < 0.7 * losses[0], losses
    assert read_meta(resolve_checkpoint(out))["chat_template"] == "gptforge"

    prompt = HI["messages"][:1]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"chosen": [*prompt, {"role": "assistant", "content": "hello!"}],
         "rejected": [*prompt, {"role": "assistant", "content": "go"}]}])
    assert main(["dpo", f"init_from={out}", f"finetune.data={pairs}",
                 f"train.out_dir={tmp_path / 'dpo'}", "train.max_steps=2", "train.batch_size=1",
                 *QUIET]) == 0
    dpo = [r for r in read_metrics(tmp_path / "dpo" / "metrics.jsonl") if "loss" in r]
    assert dpo[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at first

    # A named template is recorded and chat uses it (its end marker is text for this tokenizer).
    assert main(["sft", f"init_from={base}", f"finetune.data={data}",
                 f"train.out_dir={tmp_path / 'chatml'}", "train.max_steps=1",
                 "finetune.chat_template=chatml", "train.batch_size=1", *QUIET]) == 0
    generator = gptforge.load(tmp_path / "chatml", device="cpu")
    assert generator.chat_template.name == "chatml"
    assert isinstance(generator.chat(prompt, max_new_tokens=8), str)
    # ... and exported for transformers as its Jinja.
    hf_dir = tmp_path / "hf"
    assert main(["export", str(tmp_path / "chatml"), "--format", "huggingface",
                 "--out", str(hf_dir)]) == 0
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHATML.jinja()


def test_chat_api_returns_reasoning_and_tool_calls(base):
    reply = scripted(base, WEATHER["messages"][1]).chat(WEATHER["messages"][:1], tools=[TOOL])
    assert (str(reply), reply.reasoning) == ("", "tool")
    assert [c["function"] for c in reply.tool_calls] == [CALL["function"]]
    reply = scripted(base, HI["messages"][1]).chat(HI["messages"][:1])
    assert reply == "hello!" and reply.reasoning == "greet" and reply.tool_calls == []


def test_repl_shows_the_reasoning_apart(base, monkeypatch, capsys):
    generator = scripted(base, HI["messages"][1])
    monkeypatch.setattr(gptforge, "load", lambda *args, **kwargs: generator)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/history\n"))
    assert main(["chat", str(base), "--device", "cpu", "--temperature", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["thinking> greet", "assistant> hello!"]
    assert "[assistant thinking] greet" in lines and "[assistant] hello!" in lines


def scripted_sampler(generator, turn: dict):
    """The server's sampler class, made to pick the tokens of ``turn`` one after the other (as
    a model trained on the template writes them) whatever the logits say."""
    from gptforge.inference.engine import SequenceSampler

    ids = generator.tokenizer.encode("".join(s.text for s in DEFAULT.segments([turn])
                                             if s.learn))

    class ScriptedSampler(SequenceSampler):
        def __init__(self, prompt, *args, **kwargs):
            super().__init__(prompt, *args, **kwargs)
            self.start = self.length

        def sample(self, logits):
            token = ids[min(self.length - self.start, len(ids) - 1)]
            forced = torch.full_like(logits, float("-inf"))
            forced[:, token] = 0.0
            return super().sample(forced)

    return ScriptedSampler


def test_serve_returns_reasoning_content_and_tool_calls(base, monkeypatch):
    from gptforge.serve import scheduler

    generator = gptforge.load(base, device="cpu")
    monkeypatch.setattr(scheduler, "SequenceSampler",
                        scripted_sampler(generator, WEATHER["messages"][1]))
    server = ModelServer(generator, port=0, model_name="tiny")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        body = {"messages": WEATHER["messages"][:1], "tools": [TOOL]}
        status, _, answer = call(server, "POST", "/v1/chat/completions", body)
        assert status == 200, answer
        [choice] = answer["choices"]
        assert choice["finish_reason"] == "tool_calls"
        message = choice["message"]
        assert message["reasoning_content"] == "tool" and message["content"] == ""
        [tool_call] = message["tool_calls"]
        assert tool_call["function"] == CALL["function"] and tool_call["type"] == "function"
        status, _, raw = call(server, "POST", "/v1/chat/completions", {**body, "stream": True})
        deltas = [e["choices"][0] for e in events(raw) if e != "[DONE]"]
        assert "".join(d["delta"].get("reasoning_content", "") for d in deltas) == "tool"
        calls = [c for d in deltas for c in d["delta"].get("tool_calls", [])]
        assert [c["function"] for c in calls] == [CALL["function"]] and calls[0]["index"] == 0
        assert deltas[-1]["finish_reason"] == "tool_calls"
        # Without tools offered, the call's text stays in the content.
        status, _, answer = call(server, "POST", "/v1/chat/completions",
                                 {"messages": WEATHER["messages"][:1]})
        [choice] = answer["choices"]
        assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
        assert choice["message"]["content"].startswith("<tool_call>")
    finally:
        server.shutdown()
        server.close()
