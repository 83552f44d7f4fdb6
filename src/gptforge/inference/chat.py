"""Chatting with a fine-tuned model: turns rendered by the chat template, replies streamed.

A reply is generated from the conversation so far followed by the opening of an assistant turn
(:func:`~gptforge.tokenizer.chat_template.render_prompt`) and ends at ``<|end|>`` or
``<|endoftext|>``. The other chat markers (``<|system|>``, ``<|user|>``, ``<|assistant|>``) and
``<|pad|>`` are never sampled: only the template writes them, so a reply cannot start a fake turn.

The model sees at most ``block_size`` tokens, and the reply needs ``max_new_tokens`` of them, so
before each reply the conversation is fitted into ``block_size - max_new_tokens`` tokens: the
oldest user/assistant turns are dropped first (the system message always stays); if the newest
message alone is still too long, its beginning is cut off, with a warning.

:class:`ChatSession` keeps the history for ``gptforge chat``; ``TextGenerator.chat(messages)``
(:func:`complete_chat`) answers one message list and keeps no history.

Each reply is generated from the whole rendered conversation, but not computed from scratch: a
session keeps its KV cache (and the token ids it holds) from one reply to the next, and the engine
prefills only the tokens of the new prompt beyond the longest prefix it shares with the cache
(see ``engine.py``). After a reply the cache holds the previous prompt and the reply's tokens, so
the new prompt usually differs only by ``<|end|>`` and the new user turn. Wherever the rendering
changes earlier (old turns dropped to fit, a new system message, a reset, or a reply whose text
re-encodes to other ids than were sampled, as byte-level BPE may), the cache is kept up to the
first differing token and the rest is recomputed, so replies are those of a fresh prefill.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from gptforge.errors import GptforgeError
from gptforge.inference.kv_cache import KVCache
from gptforge.inference.reply import ChatReply, parse_reply
from gptforge.inference.sampling import SamplingSettings, settings_from_kwargs
from gptforge.tokenizer.chat_template import DEFAULT, ChatTemplate, check_messages, render_prompt

if TYPE_CHECKING:
    import torch

    from gptforge.inference.textgen import TextGenerator

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 256


def default_max_new_tokens(block_size: int) -> int:
    """256, or half the context window if that is smaller, so the conversation keeps room."""
    return max(1, min(MAX_NEW_TOKENS, block_size // 2))


def prompt_budget(block_size: int, max_new_tokens: int) -> int:
    """Tokens left for the prompt once the reply's ``max_new_tokens`` are reserved."""
    if not 0 < max_new_tokens < block_size:
        raise GptforgeError(f"max_new_tokens ({max_new_tokens}) must be between 1 and the "
                            f"context window ({block_size} tokens) minus the prompt; try "
                            f"{default_max_new_tokens(block_size)}")
    return block_size - max_new_tokens


def fit_conversation(tokenizer, messages: list[dict], budget: int,
                     template: ChatTemplate = DEFAULT, tools: list[dict] | None = None
                     ) -> tuple[list[dict], list[int]]:
    """``messages`` shortened so that their prompt has at most ``budget`` tokens, and that prompt.

    Drops the oldest turns after a leading system message (a user message together with the
    assistant reply that follows it), never the last message; then, if needed, cuts the last
    message's content from the left.
    """
    check_messages(messages)
    if not messages:
        raise GptforgeError("no messages to reply to")
    def render(kept: list[dict]) -> list[int]:
        return render_prompt(tokenizer, kept, template, tools)

    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = list(messages[len(head):])
    prompt = render(head + turns)
    while len(prompt) > budget and len(turns) > 1:
        turns.pop(0)
        while len(turns) > 1 and turns[0]["role"] != "user":  # start with a user turn
            turns.pop(0)
        prompt = render(head + turns)
    if len(prompt) > budget:
        turns[-1] = _cut_left(render, head, turns[-1], budget)
        prompt = render(head + turns)
    return head + turns, prompt


def _cut_left(render, head: list[dict], message: dict, budget: int) -> dict:
    """``message`` keeping the longest end of its content whose prompt fits ``budget`` tokens."""
    text = message["content"]

    def fits(n_chars: int) -> bool:
        kept = {**message, "content": text[len(text) - n_chars:]}
        return len(render(head + [kept])) <= budget

    if not fits(0):
        raise GptforgeError(f"the system message and the chat markers alone exceed the "
                            f"{budget} tokens left for the prompt; shorten the system message "
                            "or lower max_new_tokens")
    lo, hi = 0, len(text)  # fits(lo) holds; find the largest such n (binary search)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    log.warning("the %s message is too long for the context window: only its last %d of %d "
                "characters are used", message["role"], lo, len(text))
    return {**message, "content": text[len(text) - lo:]}


def reply_steps(generator: TextGenerator, prompt: list[int], settings: SamplingSettings,
                cache: KVCache | None = None, num_samples: int = 1) -> Iterator[torch.Tensor]:
    """The engine's steps ((num_samples,) ids each) of replies to the rendered ``prompt``: the
    turn ends at a stop id of the generator's chat template, and the other chat markers are
    never sampled."""
    tokenizer = generator.tokenizer
    stops = generator.chat_template.stop_ids(tokenizer)
    return generator.engine.generate(prompt, settings, num_samples=num_samples, stop_ids=stops,
                                     banned_ids=banned_ids(tokenizer, generator.chat_template),
                                     cache=cache)


def banned_ids(tokenizer, template: ChatTemplate = DEFAULT) -> list[int]:
    """The special ids a reply never samples: the markers only the template writes."""
    return sorted(set(tokenizer.special_tokens.values()) - set(template.stop_ids(tokenizer)))


def stream_reply(generator: TextGenerator, prompt: list[int], settings: SamplingSettings,
                 cache: KVCache | None = None) -> Iterator[str]:
    """Text pieces of the assistant's reply to the rendered ``prompt``, until its turn ends.

    With a ``cache`` (``generator.engine.new_cache()``) kept from the previous reply, only the
    part of ``prompt`` it does not hold is prefilled."""
    template, tokenizer = generator.chat_template, generator.tokenizer
    steps = reply_steps(generator, prompt, settings, cache)
    pieces = generator.decode_stream(steps, template.stop_ids(tokenizer))
    yield from cut_at(pieces, template.stop_strings(tokenizer))


def cut_at(pieces: Iterator[str], ends: tuple[str, ...]) -> Iterator[str]:
    """``pieces`` up to the first of ``ends`` (an end-of-turn marker the tokenizer has no single
    token for, so the template writes it as text); text that may start one is held back."""
    if not ends:
        yield from pieces
        return
    held = ""
    for piece in pieces:
        held += piece
        found = [i for i in (held.find(e) for e in ends) if i >= 0]
        if found:
            yield held[:min(found)]
            return
        keep = max((k for e in ends for k in range(1, len(e)) if held.endswith(e[:k])),
                   default=0)
        yield held[:len(held) - keep]
        held = held[len(held) - keep:]
    yield held


def complete_chat(generator: TextGenerator, messages: list[dict], *,
                  max_new_tokens: int | None = None, cache: KVCache | None = None,
                  tools: list[dict] | None = None, **sampling) -> ChatReply:
    """The assistant's reply to ``messages`` (fitted to the context window first), its
    reasoning and tool calls apart; ``cache``: see :func:`stream_reply`."""
    block_size = generator.model.config.block_size
    max_new_tokens = max_new_tokens or default_max_new_tokens(block_size)
    budget = prompt_budget(block_size, max_new_tokens)
    _, prompt = fit_conversation(generator.tokenizer, list(messages), budget,
                                 generator.chat_template, tools)
    settings = settings_from_kwargs(max_new_tokens=max_new_tokens, **sampling)
    return parse_reply("".join(stream_reply(generator, prompt, settings, cache)))


class ChatSession:
    """A conversation with a model: ``reply(text)`` streams an answer and records both turns.

    ``history`` holds the user and assistant turns (``{"role", "content"}``), oldest first, as the
    model last saw them: turns dropped to fit the context are gone from it too. ``system`` is kept
    apart and sent first with every reply. ``sampling`` are :class:`SamplingSettings` fields; with
    a ``seed``, the n-th reply uses ``seed + n``, so a session is reproducible but replies differ.
    ``cache`` is the KV cache kept between replies (see the module docstring); read one reply to
    its end (or close it) before asking for the next.
    """

    def __init__(self, generator: TextGenerator, system: str | None = None,
                 max_new_tokens: int | None = None, **sampling):
        self.generator = generator
        self.system = system or None
        block_size = generator.model.config.block_size
        self.max_new_tokens = max_new_tokens or default_max_new_tokens(block_size)
        self.budget = prompt_budget(block_size, self.max_new_tokens)
        self.seed = sampling.pop("seed", None)
        self.settings = settings_from_kwargs(max_new_tokens=self.max_new_tokens, **sampling)
        self.history: list[dict] = []
        self.replies = 0
        self.cache = generator.engine.new_cache()

    def messages(self) -> list[dict]:
        """The system message (if any) followed by the history."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def reset(self) -> None:
        """Forget the turns; the system message stays (and so do its keys/values in the cache:
        the next prompt starts with it, and everything after it is recomputed)."""
        self.history = []

    def reply(self, user_text: str) -> Iterator[str]:
        """Stream the assistant's answer to ``user_text``; then both turns are in ``history``.

        The prompt is built here, so a message the tokenizer cannot encode raises at once, with
        the history untouched. If the caller stops reading early (an interrupt), the partial
        answer is what gets recorded.
        """
        messages = self.messages() + [{"role": "user", "content": user_text}]
        fitted, prompt = fit_conversation(self.generator.tokenizer, messages, self.budget,
                                          self.generator.chat_template)
        seed = None if self.seed is None else self.seed + self.replies
        return self._stream(fitted, prompt, dataclasses.replace(self.settings, seed=seed))

    def _stream(self, fitted: list[dict], prompt: list[int],
                settings: SamplingSettings) -> Iterator[str]:
        pieces: list[str] = []
        try:
            for piece in stream_reply(self.generator, prompt, settings, self.cache):
                pieces.append(piece)
                yield piece
        finally:
            self.history = fitted[1:] if self.system else fitted
            self.history.append(parse_reply("".join(pieces)).message())
            self.replies += 1
