"""One completion request run on the model: prompt ids, then text pieces per choice as the engine
produces token ids, cut at stop strings, with finish reasons and token counts.

Chat prompts are rendered by the chat template, and a turn ends at ``<|end|>`` with the other
markers never sampled, as in :func:`~gptforge.inference.chat.reply_steps`; text prompts are
continued until the end-of-text token; ids become text through
:class:`~gptforge.inference.textgen.TextDecoder`. The ids come from the server's scheduler
(``scheduler.py``), which samples as ``Engine.generate`` does, so with the same settings a reply is
the text ``gptforge.load(path).chat(messages)`` or ``.stream(prompt)`` gives. ``n`` choices are
``n`` rows sampled together with one generator, as the engine's ``num_samples``.

The prompt and the reply must fit the context window (prompt tokens + max_tokens <= block_size,
the rule of the OpenAI API): a prompt is never cut and the model never runs past the length it
was trained on. ``completion_tokens`` counts every token sampled for a choice, the end-of-turn or
end-of-text token that finished it included.

A chat reply is rendered by the model's chat template (the one it was fine-tuned with, with the
request's ``tools``) and split as it streams by :class:`~gptforge.inference.reply.ReplySplitter`:
reasoning goes to ``reasoning_content``, ``<tool_call>`` blocks (when the request offers tools)
become ``tool_calls`` at the end, with the finish reason ``"tool_calls"``.

Log probabilities (``logprobs``) are scored by ``inference/logprobs.py`` from the ids alone, one
per token of the returned text, tokens cut by a stop string included. The end-of-text token that
finished a text completion is listed too (it is not in the text); chat's end-of-turn token is
not. ``echo`` (text completions) returns the prompt as the start of each choice, with its tokens'
logprobs when asked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from gptforge.errors import GptforgeError
from gptforge.inference.chat import banned_ids, default_max_new_tokens
from gptforge.inference.logprobs import LogprobFollower, TokenLogprob, prompt_logprobs
from gptforge.inference.reply import ReplySplitter
from gptforge.inference.sampling import SamplingSettings, brief_repr
from gptforge.inference.textgen import TextDecoder, TextGenerator
from gptforge.serve.protocol import ApiError, GenerationRequest, logprobs_body
from gptforge.tokenizer.chat_template import render_prompt

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
            prompt = render_prompt(generator.tokenizer, request.messages,
                                   generator.chat_template, request.tools)
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
        settings = dataclasses.replace(request.sampling, max_new_tokens=max_tokens)
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
    """New text (and reasoning) of choice ``index``; ``finish_reason`` and ``tool_calls`` are set
    on its last one."""

    index: int
    text: str
    finish_reason: str | None = None
    reasoning: str = ""
    tool_calls: tuple[dict, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens since the previous delta
    offset: int = 0  # where the first of them starts in the choice's text (characters)


@dataclass
class Choice:
    decoder: TextDecoder
    stops: StopStrings
    splitter: ReplySplitter | None = None  # chat replies: reasoning and tool calls apart
    text: str = ""
    reasoning: str = ""
    tool_calls: list[dict] | None = None
    tokens: int = 0
    finish_reason: str | None = None
    follower: LogprobFollower | None = None  # scores each token when logprobs are asked for
    entries: list[TokenLogprob] = field(default_factory=list)  # scored tokens, echo first
    sent: int = 0  # entries already in a delta
    offset: int = 0  # characters of the tokens in those deltas

    def route(self, text: str, finish: bool = False) -> tuple[str, str]:
        """(content, reasoning) of new ``text``; on ``finish``, what was held back too."""
        if self.splitter is None:
            self.text += text
            return text, ""
        parts = self.splitter.feed(text)
        if finish:
            rest, self.tool_calls = self.splitter.finish()
            parts += rest
        content = "".join(t for kind, t in parts if kind == "content")
        reasoning = "".join(t for kind, t in parts if kind == "reasoning")
        self.text += content
        self.reasoning += reasoning
        return content, reasoning


class Generation:
    """A :class:`Job`'s choices as token ids arrive: :meth:`push` each step's ids (one per
    choice), :meth:`end` when max_tokens is reached; both return the new :class:`Delta` pieces.
    Then read the texts, reasons and counts.

    ``stop_ids`` end a choice, ``banned_ids`` are never to be sampled (chat: the template's
    markers, as in ``gptforge chat``). ``is_cancelled`` is asked before every step (see
    :meth:`stop_asked`); once it says True (the client went away), :attr:`cancelled` is set.
    """

    def __init__(self, generator: TextGenerator, job: Job,
                 is_cancelled: Callable[[], bool] = lambda: False):
        self.generator, self.job = generator, job
        self.is_cancelled = is_cancelled
        self.cancelled = False
        tokenizer, template = generator.tokenizer, generator.chat_template
        chat = job.request.kind == "chat"
        stops = job.request.stop + (template.stop_strings(tokenizer) if chat else ())
        self.choices = [Choice(TextDecoder(tokenizer), StopStrings(stops),
                               ReplySplitter(tools=bool(job.request.tools)) if chat else None)
                        for _ in range(job.request.n)]
        self.stop_ids = set(template.stop_ids(tokenizer) if chat else [tokenizer.eos_id])
        self.banned_ids = banned_ids(tokenizer, template) if chat else []
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
    def reasonings(self) -> list[str]:
        return [c.reasoning for c in self.choices]

    @property
    def tool_calls(self) -> list[list[dict]]:
        return [c.tool_calls or [] for c in self.choices]

    @property
    def finish_reasons(self) -> list[str | None]:
        return [c.finish_reason for c in self.choices]

    @property
    def finished(self) -> bool:
        return all(c.finish_reason for c in self.choices)

    def push(self, tokens: list[int]) -> list[Delta]:
        """The text the step's ``tokens`` (one per choice) add."""
        deltas = (self._advance(i, token) for i, token in enumerate(tokens))
        return [d for d in deltas if d is not None]

    def end(self, reason: str = "length") -> list[Delta]:
        """Finish the choices still open (max_tokens reached, or the time was up)."""
        return [self._finish(i, c.stops.flush(), reason)
                for i, c in enumerate(self.choices) if c.finish_reason is None]

    def start(self) -> list[Delta]:
        """What comes before any generated token: with ``echo`` (text completions), the prompt
        as each choice's first text, with its tokens' logprobs if asked for."""
        request, model = self.job.request, self.generator.model
        if not request.echo:
            return []
        entries = [] if request.logprobs is None else prompt_logprobs(
            model, self.job.prompt, self.generator.tokenizer.vocab_size, request.logprobs)
        deltas = []
        for i, choice in enumerate(self.choices):
            choice.text, choice.entries = request.prompt, list(entries)
            deltas.append(self._delta(i, request.prompt))
        return deltas

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

    def _delta(self, index: int, text: str, reason: str | None = None, reasoning: str = "",
               tool_calls: tuple[dict, ...] = ()) -> Delta:
        """Choice ``index``'s new ``text``, with the entries scored since its last delta."""
        choice = self.choices[index]
        new = tuple(choice.entries[choice.sent:])
        delta = Delta(index, text, reason, reasoning, tool_calls, new, choice.offset)
        choice.sent = len(choice.entries)
        choice.offset += sum(len(self._token_text(e.token)) for e in new)
        return delta

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
        content, reasoning = choice.route(text)
        return self._delta(index, content, reasoning=reasoning) if content or reasoning else None

    def _finish(self, index: int, text: str, reason: str) -> Delta:
        choice = self.choices[index]
        content, reasoning = choice.route(text, finish=True)
        if choice.tool_calls and reason == "stop":
            reason = "tool_calls"
        choice.finish_reason = reason
        return self._delta(index, content, reason, reasoning, tuple(choice.tool_calls or ()))

    def stop_asked(self) -> bool:
        self.cancelled = self.cancelled or self.is_cancelled()
        return self.cancelled
