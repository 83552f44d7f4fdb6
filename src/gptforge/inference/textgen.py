"""Text in, text out: a checkpoint's model and tokenizer around the token-id engine.

This is what ``gptforge generate`` and ``gptforge.load(path).generate(...)`` use, and ``.chat()``
for conversations (see ``chat.py``); :class:`CompletionSession` continues a story turn by turn
(``gptforge generate --interactive``). Streaming decodes the whole continuation so far and emits
only the new suffix, which is correct for tokenizers whose tokens are partial UTF-8 characters
(byte-level BPE): an incomplete character is held back until its last byte arrives
(:class:`TextDecoder`, one per sample).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from gptforge.checkpoints.format import read_meta, resolve_checkpoint
from gptforge.checkpoints.loading import build_model
from gptforge.errors import GptforgeError
from gptforge.inference.engine import Engine
from gptforge.inference.int8 import QUANTIZATIONS, quantize_int8
from gptforge.inference.kv_cache import KVCache
from gptforge.inference.sampling import SamplingSettings, settings_from_kwargs
from gptforge.model.gpt import GPT
from gptforge.runtime.device import cpu_has_native_bf16, resolve_device
from gptforge.tokenizer.chat_template import DEFAULT, ChatTemplate, chat_template


def load_model(ckpt: Path, device: torch.device, quantize: str | None = None) -> GPT:
    """The checkpoint's model on ``device``, LoRA adapters merged (``checkpoints/loading.py``).
    ``quantize="int8"``: weight-only int8 linear layers (``int8.py``), from the float32 weights."""
    model = build_model(ckpt)
    if quantize is not None:
        if quantize not in QUANTIZATIONS:
            raise GptforgeError(f"--quantize {quantize}: choose one of {', '.join(QUANTIZATIONS)}")
        quantize_int8(model)
    model.to(device)
    if device.type == "cuda":  # batch-1 decoding is memory-bound: halve the bytes read
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        model.to(torch.bfloat16 if native_bf16 else torch.float16)
    return model.eval()


class TextDecoder:
    """Token ids in, text out, one id at a time: ``push`` returns the text the id adds."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # the text returned so far

    def push(self, token: int) -> str | None:
        """The new text, or None while it ends in an incomplete UTF-8 character."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # wait for the character's remaining bytes
            return None
        piece, self.text = text[len(self.text):], text
        return piece


class TextGenerator:
    def __init__(self, model: GPT, tokenizer, compile: bool = False,
                 template: ChatTemplate = DEFAULT):
        self.model, self.tokenizer = model, tokenizer
        self.chat_template = template  # the one the model was fine-tuned with (model.json)
        # compile: a compiled static-shape decode step (2-4.5x faster at batch 1 on CPU, after a
        # 20-30 s cold compile; docs/benchmarks.md), with bf16 weights where the CPU has them.
        weight_dtype = None
        if compile and model.lm_head.weight.device.type == "cpu" and cpu_has_native_bf16():
            weight_dtype = torch.bfloat16
        self.engine = Engine(model, vocab_size=tokenizer.vocab_size, compile=compile,
                             weight_dtype=weight_dtype)
        self._chat_cache = None  # the KV cache .chat() keeps from one call to the next
        self._chat_cache_lock = threading.Lock()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", compile: bool = False,
                        quantize: str | None = None) -> TextGenerator:
        from gptforge.tokenizer import load_tokenizer

        if compile and quantize:
            raise GptforgeError(f"--quantize {quantize} cannot be combined with --compile: the "
                                "compiled decode step reads float weights; choose one")
        ckpt = resolve_checkpoint(path)
        model = load_model(ckpt, resolve_device(device), quantize)
        tokenizer = load_tokenizer(ckpt / "tokenizer")
        template = chat_template(read_meta(ckpt).get("chat_template", "gptforge"), tokenizer)
        return cls(model, tokenizer, compile=compile, template=template)

    def encode_prompt(self, prompt: str) -> list[int]:
        # An empty prompt starts a new document, which is what the separator token means.
        return self.tokenizer.encode(prompt) if prompt else [self.tokenizer.eos_id]

    def stream_ids(self, prompt: str | list[int], settings: SamplingSettings,
                   num_samples: int = 1, cache: KVCache | None = None) -> Iterator[torch.Tensor]:
        """The engine's steps continuing ``prompt`` (text, or ids from :meth:`encode_prompt`)
        until EOS; ``cache``: see ``Engine.generate``."""
        ids = prompt if isinstance(prompt, list) else self.encode_prompt(prompt)
        return self.engine.generate(ids, settings, num_samples=num_samples,
                                    stop_ids=[self.tokenizer.eos_id], cache=cache)

    def stream(self, prompt: str, **kwargs) -> Iterator[str]:
        """Yield pieces of text of one sample as they are generated (EOS not included);
        ``kwargs``: :class:`~gptforge.inference.sampling.SamplingSettings` fields."""
        steps = self.stream_ids(prompt, settings_from_kwargs(**kwargs))
        yield from self.decode_stream(steps, stop_ids=[self.tokenizer.eos_id])

    def decode_stream(self, steps: Iterator[torch.Tensor], stop_ids) -> Iterator[str]:
        """Text pieces of the first row of an engine's ``steps``, up to (without) a stop id."""
        decoder = TextDecoder(self.tokenizer)
        for step in steps:
            token = int(step[0])
            if token in stop_ids:
                break
            piece = decoder.push(token)
            if piece is not None:
                yield piece

    def generate(self, prompt: str, *, num_samples: int = 1, **kwargs) -> str | list[str]:
        """The continuation of ``prompt`` (a list of them if ``num_samples > 1``).

        ``kwargs`` are :class:`~gptforge.inference.sampling.SamplingSettings` fields:
        ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``,
        ``frequency_penalty``, ``presence_penalty``, ``seed``; the penalties count each row's
        own generated tokens."""
        rows: list[list[int]] = [[] for _ in range(num_samples)]
        finished = [False] * num_samples
        for step in self.stream_ids(prompt, settings_from_kwargs(**kwargs), num_samples):
            for i, token in enumerate(step.tolist()):
                finished[i] = finished[i] or token == self.tokenizer.eos_id
                if not finished[i]:
                    rows[i].append(token)
        texts = [self.tokenizer.decode(r) for r in rows]
        return texts[0] if num_samples == 1 else texts

    def chat(self, messages: list[dict], **kwargs) -> str:
        """The assistant's reply to a conversation ``[{"role", "content"}, ...]``: a
        :class:`~gptforge.inference.reply.ChatReply`, the answer as a ``str`` with ``.reasoning``
        and ``.tool_calls`` beside it (``tools=[...]`` offers tools, OpenAI's shape).

        ``kwargs`` are sampling settings (``max_new_tokens``, ``temperature``, ...); the oldest
        turns are left out if the conversation does not fit the context (see ``chat.py``). No
        history is kept, only the KV cache of the last call: a conversation passed again with
        one more turn prefills just the new tokens. The reply does not depend on it.
        """
        from gptforge.inference.chat import complete_chat

        # Calls from several threads at once: the one holding the kept cache uses it, the others
        # start from an empty one.
        if not self._chat_cache_lock.acquire(blocking=False):
            return complete_chat(self, messages, **kwargs)
        try:
            if self._chat_cache is None:
                self._chat_cache = self.engine.new_cache()
            return complete_chat(self, messages, cache=self._chat_cache, **kwargs)
        finally:
            self._chat_cache_lock.release()


class CompletionSession:
    """A story continued turn by turn (``gptforge generate --interactive``).

    ``extend(text)`` appends ``text`` to the story and streams the model's continuation, which is
    appended too: the story accumulates (prompt + continuation + new text + continuation ...).
    ``settings`` may be replaced between turns; with a ``seed``, the n-th turn uses ``seed + n``.
    The KV cache is kept from one turn to the next, so each turn prefills only the tokens beyond
    what the cache already holds (``Engine.generate``); the text is what a fresh prefill gives.
    """

    def __init__(self, generator: TextGenerator, settings: SamplingSettings):
        self.generator, self.settings = generator, settings
        self.story = ""
        self.turns = 0
        self.cache = generator.engine.new_cache()

    def reset(self) -> None:
        """Start over with an empty story (the cache is rewound by the next prompt)."""
        self.story = ""

    def extend(self, text: str) -> Iterator[str]:
        """Stream the continuation of the story followed by ``text``. The prompt is encoded here,
        so text the tokenizer cannot encode raises at once, with the story untouched."""
        story = self.story + text
        ids = self.generator.encode_prompt(story)
        seed = None if self.settings.seed is None else self.settings.seed + self.turns
        settings = dataclasses.replace(self.settings, seed=seed)
        return self._stream(story, self.generator.stream_ids(ids, settings, cache=self.cache))

    def _stream(self, story: str, steps: Iterator[torch.Tensor]) -> Iterator[str]:
        pieces: list[str] = []
        try:
            for piece in self.generator.decode_stream(steps, [self.generator.tokenizer.eos_id]):
                pieces.append(piece)
                yield piece
        finally:  # an interrupted continuation keeps what was shown
            self.story = story + "".join(pieces)
            self.turns += 1
