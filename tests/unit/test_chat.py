"""Chat: fitting a conversation into the context window, sessions, banned special tokens, and the
KV cache kept between replies (which must never change a reply)."""

from __future__ import annotations

import logging

import pytest
import torch

from gptforge.errors import GptforgeError
from gptforge.inference.chat import ChatSession, fit_conversation, stream_reply
from gptforge.inference.sampling import SamplingSettings
from gptforge.inference.textgen import TextGenerator
from gptforge.model import GPT
from gptforge.tokenizer import train_tokenizer
from gptforge.tokenizer.chat_template import encode_content, render_prompt, stop_ids
from tests.tiny_checkpoints import CHARS_TEXT, tiny_config


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer("char", [CHARS_TEXT])


def generator_for(tokenizer, block_size: int, **config) -> TextGenerator:
    torch.manual_seed(0)
    model = GPT(tiny_config(tokenizer.vocab_size, block_size=block_size, **config)).eval()
    return TextGenerator(model, tokenizer)


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


# ---- the KV cache kept between replies ---------------------------------------------------------

def record_prefills(generator: TextGenerator) -> list[tuple[int, int]]:
    """(positions reused from the cache, tokens run) of each prefill from now on."""
    prefills = []

    def hook(module, args, kwargs):
        if kwargs.get("logits_to_keep"):  # prefills ask for the last logits; decode steps don't
            prefills.append((kwargs["kv_cache"].pos, args[0].size(1)))

    generator.model.register_forward_pre_hook(hook, with_kwargs=True)
    return prefills


def fresh_session(generator: TextGenerator, system: str | None, texts: list[str],
                  max_new_tokens: int) -> tuple[list[str], list[dict]]:
    """Replies and history of a session as it ran before the cache was kept: every prompt is
    fitted and then prefilled from an empty cache."""
    budget = generator.model.config.block_size - max_new_tokens
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0)
    head = [{"role": "system", "content": system}] if system else []
    history, replies = [], []
    for text in texts:
        fitted, prompt = fit_conversation(generator.tokenizer,
                                          head + history + [{"role": "user", "content": text}],
                                          budget)
        replies.append("".join(stream_reply(generator, prompt, settings)))
        history = fitted[len(head):] + [{"role": "assistant", "content": replies[-1]}]
    return replies, history


def shared(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


TEXTS = ["hello there", "how are you?", "tell me more.", "why?", "and then?"]


def test_replies_with_the_kept_cache_are_those_of_a_fresh_prefill(tokenizer):
    generator = generator_for(tokenizer, block_size=256, init_std=0.3)
    expected, expected_history = fresh_session(generator, "Be brief.", TEXTS, 16)
    prefills = record_prefills(generator)
    session = ChatSession(generator, system="Be brief.", max_new_tokens=16, temperature=0)
    prompts = []
    for text in TEXTS:
        prompts.append(render_prompt(tokenizer, session.messages() + [
            {"role": "user", "content": text}]))
        assert "".join(session.reply(text)) == expected.pop(0)
    assert session.history == expected_history
    assert len(set(m["content"] for m in session.history[1::2])) > 1  # varied replies
    assert prefills[0] == (0, len(prompts[0]))
    for prompt, previous, (start, run) in zip(prompts[1:], prompts, prefills[1:]):
        # Only the tail runs: everything from the previous prompt (and its reply) is reused.
        assert start > len(previous) and start + run == len(prompt) and run < 20


def test_a_cut_conversation_is_fitted_as_before_and_recomputed_where_it_changed(tokenizer):
    generator = generator_for(tokenizer, block_size=48, init_std=0.3)
    texts = [f"tell me about item {i}" for i in range(6)]
    expected, expected_history = fresh_session(generator, "Be brief.", texts, 12)
    prefills = record_prefills(generator)
    session = ChatSession(generator, system="Be brief.", max_new_tokens=12, temperature=0)
    previous = []
    dropped = 0
    for text, reply in zip(texts, expected):
        prompt = fit_conversation(tokenizer, session.messages() + [
            {"role": "user", "content": text}], session.budget)[1]
        assert "".join(session.reply(text)) == reply
        start, run = prefills.pop(0)
        assert start + run == len(prompt) <= 48 - 12
        if prompt[:len(previous)] != previous:  # old turns dropped: the prompt changed early on
            assert start == shared(previous, prompt) < len(previous)  # reused up to the change
            dropped += 1
        previous = prompt
    assert dropped and session.history == expected_history


def test_a_new_system_message_or_a_reset_recomputes_from_the_first_change(tokenizer):
    generator = generator_for(tokenizer, block_size=256, init_std=0.3)
    prefills = record_prefills(generator)
    session = ChatSession(generator, system="Be brief.", max_new_tokens=10, temperature=0)
    "".join(session.reply("hello"))
    "".join(session.reply("more"))
    for change in ("system", "reset"):
        previous = render_prompt(tokenizer, session.messages())
        if change == "system":
            session.system = "Be kind."
        else:
            session.reset()
        prompt = render_prompt(tokenizer, session.messages() + [{"role": "user", "content": "x"}])
        reply = "".join(session.reply("x"))
        assert prefills[-1] == (shared(previous, prompt), len(prompt) - shared(previous, prompt))
        settings = SamplingSettings(max_new_tokens=10, temperature=0)
        assert reply == "".join(stream_reply(generator, prompt, settings))  # an empty cache


def test_a_reply_that_re_encodes_differently_keeps_only_the_common_prefix():
    # Byte-level BPE: a random model samples ids that decode to invalid UTF-8, shown as U+FFFD,
    # which encodes to other ids; merges can differ too. The cache holds the sampled ids.
    tokenizer = train_tokenizer("bpe", [CHARS_TEXT * 20 + " the cat sat on the mat." * 50], 300)
    generator = generator_for(tokenizer, block_size=256, init_std=0.3)
    texts = ["the cat", "the mat", "on the", "sat"]
    expected, _ = fresh_session(generator, None, texts, 12)
    sampled = []
    generate = generator.engine.generate

    def recording_generate(prompt, settings, **kwargs):
        sampled.append((list(prompt), []))
        for step in generate(prompt, settings, **kwargs):
            sampled[-1][1].append(int(step[0]))
            yield step

    generator.engine.generate = recording_generate
    prefills = record_prefills(generator)
    session = ChatSession(generator, max_new_tokens=12, temperature=0)
    differed = 0
    for i, text in enumerate(texts):
        assert "".join(session.reply(text)) == expected[i]
        if i == 0:
            continue
        (old_prompt, ids), (prompt, _) = sampled[-2], sampled[-1]
        fed = ids if ids[-1] in stop_ids(tokenizer) else ids[:-1]  # the last id is never fed
        fed = [t for t in fed if t not in stop_ids(tokenizer)]
        rendered = encode_content(tokenizer, session.history[-3]["content"])
        differed += rendered[:len(fed)] != fed
        start = shared(old_prompt + fed, prompt)
        assert prefills[-1] == (start, len(prompt) - start)
        assert len(old_prompt) <= start <= len(old_prompt) + shared(fed, rendered)
    assert differed


def test_an_interrupted_reply_leaves_a_usable_cache(tokenizer):
    generator = generator_for(tokenizer, block_size=256, init_std=0.3)
    session = ChatSession(generator, max_new_tokens=16, temperature=0)
    pieces = session.reply("hello there")
    partial = next(pieces) + next(pieces)
    pieces.close()  # what Ctrl-C does: the partial reply is recorded
    assert session.history[-1] == {"role": "assistant", "content": partial}
    reply = "".join(session.reply("go on"))
    prompt = render_prompt(tokenizer, session.messages()[:-1])
    settings = SamplingSettings(max_new_tokens=16, temperature=0)
    assert reply == "".join(stream_reply(generator, prompt, settings))


def test_chat_api_reuses_the_cache_of_its_last_call(tokenizer):
    generator = generator_for(tokenizer, block_size=256, init_std=0.3)
    settings = dict(max_new_tokens=12, temperature=0)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    prefills = record_prefills(generator)
    for text in ("and you?", "why?"):
        reply = generator.chat(messages, **settings)
        messages += [{"role": "assistant", "content": reply},
                     {"role": "user", "content": text}]
    prompt = render_prompt(tokenizer, messages)
    reply = generator.chat(messages, **settings)
    assert prefills[-1][0] > 0 and sum(prefills[-1]) == len(prompt)
    assert reply == "".join(stream_reply(generator, prompt, SamplingSettings(**settings)))
