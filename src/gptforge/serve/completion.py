"""One completion request run on the model: prompt ids, then text pieces per choice as the engine
produces token ids, cut at stop strings, with finish reasons and token counts.

The generation itself is the library's: chat prompts are rendered by the chat template and
continued by :func:`~gptforge.inference.chat.reply_steps` (which ends a turn at ``<|end|>`` and
never samples the other markers), text prompts by ``TextGenerator.stream_ids``; ids become text
through :class:`~gptforge.inference.textgen.TextDecoder`. So with the same settings a reply is the
text ``gptforge.load(path).chat(messages)`` or ``.stream(prompt)`` gives. ``n`` choices are the
engine's ``num_samples`` rows, sampled together in one batch.

The prompt and the reply must fit the context window (prompt tokens + max_tokens <= block_size,
the rule of the OpenAI API): a prompt is never cut and the model never runs past the length it
was trained on. ``completion_tokens`` counts every token sampled for a choice, the end-of-turn or
end-of-text token that finished it included.

Log probabilities (``logprobs``) are scored by ``inference/logprobs.py`` from the ids alone, one
per token of the returned text, tokens cut by a stop string included. The end-of-text token that
finished a text completion is listed too (it is not in the text); chat's end-of-turn token is
not. ``echo`` (text completions) returns the prompt as the start of each choice, with its tokens'
logprobs when asked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from gptforge.errors import GptforgeError
from gptforge.inference.chat import default_max_new_tokens, reply_steps
from gptforge.inference.engine import SamplingSettings, brief_repr
from gptforge.inference.kv_cache import KVCache
from gptforge.inference.logprobs import LogprobFollower, TokenLogprob, prompt_logprobs
from gptforge.inference.textgen import TextDecoder, TextGenerator
from gptforge.serve.protocol import ApiError, GenerationRequest, logprobs_body
from gptforge.tokenizer.chat_template import render_prompt, stop_ids

TEXT_MAX_TOKENS = 16  # the OpenAI API's default max_tokens for /v1/completions


@dataclass(frozen=True)
class Job:
    """A request turned into what the engine needs."""

    request: GenerationRequest
    prompt: list[int]
    settings: SamplingSettings


def prepare(generator: TextGenerator, request: GenerationRequest) -> Job:
    """Encode the prompt and settle max_tokens; :class:`ApiError` (400) if either is impossible."""
    param = "messages" if request.kind == "chat" else "prompt"
    try:
        if request.kind == "chat":
            prompt = render_prompt(generator.tokenizer, request.messages)
        else:
            prompt = generator.encode_prompt(request.prompt)
    except GptforgeError as err:  # e.g. a character a char tokenizer never saw
        raise ApiError(400, str(err), param=param) from None
    block_size = generator.model.config.block_size
    room = block_size - len(prompt)
    if room < 1:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens long; this model's context "
                            f"window is {block_size} tokens for the prompt and the reply "
                            "together; shorten the prompt", param=param,
                       code="context_length_exceeded")
    max_tokens = request.max_tokens
    if max_tokens is None:
        default = default_max_new_tokens(block_size) if request.kind == "chat" \
            else TEXT_MAX_TOKENS
        max_tokens = min(default, room)
    elif max_tokens > room:
        raise ApiError(400, f"this model's context window is {block_size} tokens; the prompt "
                            f"takes {len(prompt)}, so max_tokens can be at most {room} (got "
                            f"{brief_repr(max_tokens)}); lower it or shorten the prompt",
                       param="max_tokens", code="context_length_exceeded")
    try:  # protocol.py has checked every field; this is a second line of defence, never a 500
        settings = SamplingSettings(max_new_tokens=max_tokens, temperature=request.temperature,
                                    top_k=request.top_k, top_p=request.top_p,
                                    repetition_penalty=request.repetition_penalty,
                                    seed=request.seed)
    except GptforgeError as err:
        raise ApiError(400, str(err)) from None
    return Job(request, prompt, settings)


class StopStrings:
    """Cuts a stream of text before the first stop string.

    Text that may be the beginning of a stop string is held back until the next piece shows
    whether it is, so a streamed reply never shows part of a stop string.
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """The text that can be passed on now, and whether a stop string was reached."""
        text = self.pending + piece
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.pending = ""
            return text[:min(found)], True
        keep = self._partial_match(text)
        self.pending = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """The held-back text, once the stream ended without completing a stop string."""
        text, self.pending = self.pending, ""
        return text

    def _partial_match(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        longest = max((len(s) for s in self.stops), default=1)
        for k in range(min(len(text), longest - 1), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stops):
                return k
        return 0


@dataclass(frozen=True)
class Delta:
    """New text of choice ``index``; ``finish_reason`` is set on its last one."""

    index: int
    text: str
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens since the previous delta
    offset: int = 0  # where the first of them starts in the choice's text (characters)


@dataclass
class Choice:
    decoder: TextDecoder
    stops: StopStrings
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    follower: LogprobFollower | None = None  # scores each token when logprobs are asked for
    entries: list[TokenLogprob] = field(default_factory=list)  # scored tokens, echo first
    sent: int = 0  # entries already in a delta
    offset: int = 0  # characters of the tokens in those deltas


class Generation:
    """Runs a :class:`Job`; iterate :meth:`deltas`, then read the texts, reasons and counts.

    ``cache`` (one row, for n = 1): the KV cache kept from the previous request, so a prompt that
    repeats the last one's beginning (a chat re-sending its conversation) prefills only the rest.
    ``is_cancelled`` is asked before every step; when it says True (the client went away),
    generation stops there and :attr:`cancelled` is set.
    """

    def __init__(self, generator: TextGenerator, job: Job, cache: KVCache | None = None,
                 is_cancelled: Callable[[], bool] = lambda: False):
        self.generator, self.job, self.cache = generator, job, cache
        self.is_cancelled = is_cancelled
        self.cancelled = False
        tokenizer = generator.tokenizer
        self.choices = [Choice(TextDecoder(tokenizer), StopStrings(job.request.stop))
                        for _ in range(job.request.n)]
        chat = job.request.kind == "chat"
        self.stop_ids = set(stop_ids(tokenizer) if chat else [tokenizer.eos_id])
        # lm-evaluation-harness drops the last generated token's logprob of an echoed prompt,
        # so a text completion lists the end-of-text token that ended it (as vLLM does).
        self.scores_stop = not chat
        top_n = job.request.logprobs
        if top_n is not None:
            for choice in self.choices:
                choice.follower = LogprobFollower(generator.model, job.prompt,
                                                  tokenizer.vocab_size, top_n)

    @property
    def prompt_tokens(self) -> int:
        return len(self.job.prompt)

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.choices]

    @property
    def finish_reasons(self) -> list[str | None]:
        return [c.finish_reason for c in self.choices]

    def deltas(self) -> Iterator[Delta]:
        """The text as it is generated; closing this iterator stops the generation."""
        steps = self._steps()
        try:
            if self._stop_asked():
                return
            if self.job.request.echo:
                yield from self._echo()
            for step in steps:
                for i, token in enumerate(step.tolist()):
                    delta = self._advance(i, token)
                    if delta is not None:
                        yield delta
                if all(c.finish_reason for c in self.choices) or self._stop_asked():
                    return
            for i, choice in enumerate(self.choices):  # max_tokens reached
                if choice.finish_reason is None:
                    yield self._finish(i, choice.stops.flush(), "length")
        finally:
            steps.close()  # the engine stops at once (a generator closed mid-way)

    def _echo(self) -> Iterator[Delta]:
        """The prompt as each choice's first text, with its tokens' logprobs if asked for."""
        request, model = self.job.request, self.generator.model
        entries = [] if request.logprobs is None else prompt_logprobs(
            model, self.job.prompt, self.generator.tokenizer.vocab_size, request.logprobs)
        for i, choice in enumerate(self.choices):
            choice.text, choice.entries = request.prompt, list(entries)
            yield self._delta(i, request.prompt)

    def logprobs_body(self, index: int) -> dict | None:
        """Choice ``index``'s ``logprobs`` object for the whole reply (None if not asked)."""
        if self.job.request.logprobs is None:
            return None
        return logprobs_body(self.job.request.kind, self.choices[index].entries,
                             self._token_text)

    def delta_logprobs(self, delta: Delta) -> dict | None:
        """The ``logprobs`` object of a streamed delta's tokens (None if not asked)."""
        if self.job.request.logprobs is None:
            return None
        return logprobs_body(self.job.request.kind, delta.logprobs, self._token_text,
                             delta.offset)

    def _token_text(self, token: int) -> str:
        return self.generator.tokenizer.decode([token])

    def _delta(self, index: int, text: str, reason: str | None = None) -> Delta:
        """Choice ``index``'s new ``text``, with the entries scored since its last delta."""
        choice = self.choices[index]
        new = tuple(choice.entries[choice.sent:])
        delta = Delta(index, text, reason, new, choice.offset)
        choice.sent = len(choice.entries)
        choice.offset += sum(len(self._token_text(e.token)) for e in new)
        return delta

    def _steps(self):
        job, n = self.job, self.job.request.n
        cache = self.cache if n == 1 else None
        if job.request.kind == "chat":
            return reply_steps(self.generator, job.prompt, job.settings, cache, num_samples=n)
        return self.generator.stream_ids(job.prompt, job.settings, num_samples=n, cache=cache)

    def _advance(self, index: int, token: int) -> Delta | None:
        choice = self.choices[index]
        if choice.finish_reason is not None:  # a finished row the batch still samples
            return None
        choice.tokens += 1
        if choice.follower is not None and (token not in self.stop_ids or self.scores_stop):
            choice.entries.append(choice.follower.push(token))
        if token in self.stop_ids:
            return self._finish(index, choice.stops.flush(), "stop")
        piece = choice.decoder.push(token)
        if piece is None:  # an incomplete character
            return None
        text, stopped = choice.stops.feed(piece)
        if stopped:
            return self._finish(index, text, "stop")
        choice.text += text
        return self._delta(index, text) if text else None

    def _finish(self, index: int, text: str, reason: str) -> Delta:
        choice = self.choices[index]
        choice.text += text
        choice.finish_reason = reason
        return self._delta(index, text, reason)

    def _stop_asked(self) -> bool:
        self.cancelled = self.cancelled or self.is_cancelled()
        return self.cancelled
