"""Chat: fitting a conversation into the context window, sessions, banned special tokens."""

from __future__ import annotations

import logging

import pytest
import torch

from gptforge.errors import GptforgeError
from gptforge.inference.chat import ChatSession, fit_conversation
from gptforge.inference.engine import SamplingSettings
from gptforge.inference.textgen import TextGenerator
from gptforge.model import GPT
from gptforge.tokenizer import train_tokenizer
from gptforge.tokenizer.chat_template import render_prompt, stop_ids
from tests.tiny_checkpoints import CHARS_TEXT, tiny_config


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer("char", [CHARS_TEXT])


def generator_for(tokenizer, block_size: int) -> TextGenerator:
    torch.manual_seed(0)
    return TextGenerator(GPT(tiny_config(tokenizer.vocab_size, block_size=block_size)).eval(),
                         tokenizer)


def conversation(n_turns: int) -> list[dict]:
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(n_turns):
        messages += [{"role": "user", "content": f"question {i}?"},
                     {"role": "assistant", "content": f"answer {i}."}]
    return messages + [{"role": "user", "content": "last one?"}]


def test_oldest_turns_are_dropped_and_the_system_message_kept(tokenizer):
    messages = conversation(6)
    fitted, prompt = fit_conversation(tokenizer, messages, budget=60)
    assert len(prompt) <= 60 and prompt == render_prompt(tokenizer, fitted)
    assert fitted[0] == messages[0] and fitted[-1] == messages[-1]
    assert fitted[1]["role"] == "user"  # whole turns are dropped: it starts with a question
    assert fitted[1:] == messages[len(messages) - len(fitted) + 1:]  # the newest turns survive
    assert len(fitted) < len(messages)
    everything, _ = fit_conversation(tokenizer, messages, budget=10_000)
    assert everything == messages


def test_a_message_too_long_alone_is_cut_from_the_left(tokenizer, caplog):
    long = {"role": "user", "content": "hello " * 40 + "END"}
    with caplog.at_level(logging.WARNING):
        fitted, prompt = fit_conversation(tokenizer, [long], budget=30)
    assert len(prompt) <= 30 and len(prompt) >= 29  # as much as fits is kept
    assert long["content"].endswith(fitted[0]["content"]) and fitted[0]["content"].endswith("END")
    assert "too long for the context window" in caplog.text
    with pytest.raises(GptforgeError, match="system message and the chat markers"):
        fit_conversation(tokenizer, [{"role": "system", "content": "x" * 50}, long], budget=30)


def test_session_prompts_always_fit_the_context(tokenizer):
    generator = generator_for(tokenizer, block_size=48)
    prompts = []
    generate = generator.engine.generate

    def recording_generate(prompt, settings, **kwargs):
        prompts.append((len(prompt), settings.max_new_tokens))
        return generate(prompt, settings, **kwargs)

    generator.engine.generate = recording_generate
    session = ChatSession(generator, system="Be brief.", max_new_tokens=12, temperature=0)
    for i in range(6):
        reply = "".join(session.reply(f"tell me about item {i}"))
        assert session.history[-1] == {"role": "assistant", "content": reply}
        assert session.history[-2]["content"] == f"tell me about item {i}"
    assert all(n + new <= 48 for n, new in prompts)
    assert len(session.history) < 12  # old turns were dropped to make room
    assert [m["role"] for m in session.history] == ["user", "assistant"] * (
        len(session.history) // 2)
    session.reset()
    assert session.history == [] and session.messages()[0]["content"] == "Be brief."


def test_session_is_reproducible_with_a_seed(tokenizer):
    generator = generator_for(tokenizer, block_size=64)
    a = ChatSession(generator, max_new_tokens=8, temperature=1.0, seed=3)
    b = ChatSession(generator, max_new_tokens=8, temperature=1.0, seed=3)
    assert ["".join(a.reply("hi")) for _ in range(2)] == ["".join(b.reply("hi")) for _ in range(2)]


def test_chat_api_is_stateless_and_never_writes_markers(tokenizer):
    generator = generator_for(tokenizer, block_size=64)
    messages = [{"role": "user", "content": "hello"}]
    reply = generator.chat(messages, max_new_tokens=10, temperature=0)
    assert isinstance(reply, str) and messages == [{"role": "user", "content": "hello"}]
    assert generator.chat(messages, max_new_tokens=10, temperature=0) == reply
    for marker in ("<|system|>", "<|user|>", "<|assistant|>", "<|pad|>"):
        assert marker not in reply
    with pytest.raises(GptforgeError, match="max_new_tokens"):
        generator.chat(messages, max_new_tokens=64)


def test_engine_never_samples_banned_ids(tokenizer):
    generator = generator_for(tokenizer, block_size=64)
    prompt = render_prompt(tokenizer, [{"role": "user", "content": "hi"}])
    settings = SamplingSettings(max_new_tokens=6, temperature=0)
    first = int(next(generator.engine.generate(prompt, settings))[0])
    banned = [first, *stop_ids(tokenizer)]
    steps = list(generator.engine.generate(prompt, settings, banned_ids=banned))
    assert len(steps) == 6 and not any(int(s[0]) in banned for s in steps)
