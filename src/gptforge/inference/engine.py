"""The generation engine: prefill the prompt, then decode one token at a time.

It works on token ids only; turning text into ids is the tokenizer's job (see ``textgen.py``).
Prefill runs the whole prompt through the model in one pass and fills the KV cache; each decode
step then feeds only the newest token. When the context window is full, the cache is refilled with
the most recent half of the window (a sliding window, amortised over many steps).

Decode steps run through the model's forward by default. ``Engine(..., compile=True)`` runs them
through a compiled step instead (``decode.py``): 2-3x faster at batch size 1 on a 2-core CPU, 3-5x
with ``weight_dtype=torch.bfloat16`` (docs/benchmarks.md). The first step compiles, ~30 s cold and
~5 s with Inductor's on-disk cache warm, so it pays off for long or repeated generation (a server,
a chat session), not for one short sample. If compilation fails (no C compiler, unsupported
platform) or the model has parts the step does not cover (mixture of experts), the engine warns
once and decodes through the model.

``generate`` is a Python generator yielding one tensor of B new ids per step, so callers can
stream output as it is produced.

By default each call starts from an empty cache. A caller that sends prompts growing by appending
(a chat: every turn re-sends the conversation so far) can keep one cache across calls
(``cache=engine.new_cache()``): the positions whose token ids the new prompt shares with the cache
keep their keys and values, and only the rest of the prompt is prefilled. The output is the same
as from an empty cache, since a position's keys and values depend only on the tokens up to it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch

from gptforge.inference.kv_cache import KVCache
from gptforge.inference.sampling import (
    SamplingSettings,
    apply_frequency_presence_penalty,
    apply_repetition_penalty,
    sample_next,
)

log = logging.getLogger(__name__)
_compile_failed = False  # set once torch.compile has failed in this process: warn and retry never


class SequenceSampler:
    """Picks the next token of each of ``rows`` sequences continuing ``prompt``, one step at a
    time, with one request's settings: the penalties over its history, banned ids, then
    temperature / top-k / top-p with its own seeded generator. The engine's generation and the
    server's batched decoding (``batching.py``) both sample through it, so a request gets the
    same tokens either way."""

    def __init__(self, prompt: Sequence[int], rows: int, settings: SamplingSettings,
                 banned_ids: Sequence[int], vocab_size: int, device: torch.device):
        self.settings = settings
        n = len(prompt)
        # The whole history in one preallocated buffer; `history` is a view of its filled part.
        self.tokens = torch.empty(rows, n + settings.max_new_tokens, dtype=torch.long,
                                  device=device)
        self.tokens[:, :n] = torch.tensor(list(prompt), dtype=torch.long, device=device)
        self.length = n
        self.banned = torch.tensor(list(banned_ids), dtype=torch.long, device=device)
        # How often each row has generated each token, for the frequency/presence penalties.
        self.counts = torch.zeros(rows, vocab_size, device=device)  # (B, V)
        self.generator = None
        if settings.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(settings.seed)

    @property
    def history(self) -> torch.Tensor:
        """(rows, length) ids so far: the prompt, then one column per sampled step."""
        return self.tokens[:, :self.length]

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Next ids (rows,) from ``logits`` (rows, V); they are appended to the history."""
        s = self.settings
        if s.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, self.history, s.repetition_penalty)
        logits = apply_frequency_presence_penalty(logits, self.counts, s.frequency_penalty,
                                                  s.presence_penalty)
        if len(self.banned):
            logits = logits.index_fill(1, self.banned, float("-inf"))
        next_ids = sample_next(logits, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                               generator=self.generator)
        if self.length < self.tokens.size(1):
            self.tokens[:, self.length] = next_ids
            self.length += 1
            self.counts.scatter_add_(1, next_ids[:, None],
                                     torch.ones_like(next_ids, dtype=self.counts.dtype)[:, None])
        return next_ids


class Engine:
    def __init__(self, model: torch.nn.Module, vocab_size: int | None = None, *,
                 compile: bool = False, weight_dtype: torch.dtype | None = None):
        """``compile``: decode through the compiled step. ``weight_dtype`` (with ``compile``): keep
        its weight matrices and the KV cache in this dtype, e.g. ``torch.bfloat16``."""
        self.model = model.eval()
        self.block_size = model.config.block_size
        self.vocab_size = vocab_size or model.config.vocab_size
        self.device = model.lm_head.weight.device
        self.compile, self.weight_dtype = compile, weight_dtype
        self.decoder = None  # the compiled step, built on first use

    def new_cache(self, batch_size: int = 1) -> KVCache:
        """An empty cache for ``generate(..., cache=)`` (the compiled step with bf16 weights also
        keeps keys/values in bf16)."""
        return KVCache.for_model(self.model, batch_size,
                                 dtype=self.weight_dtype if self.compile else None)

    @torch.inference_mode()
    def generate(self, prompt: Sequence[int], settings: SamplingSettings, *,
                 num_samples: int = 1, stop_ids: Sequence[int] = (),
                 banned_ids: Sequence[int] = (), use_cache: bool = True,
                 cache: KVCache | None = None) -> Iterator[torch.Tensor]:
        """Yield (num_samples,) new token ids per step until max_new_tokens or all rows stop.

        ``banned_ids`` are never sampled (their logits are set to -inf), e.g. the chat markers
        that only the template may write. ``cache`` (from :meth:`new_cache`, ``num_samples``
        rows): start from what it holds instead of an empty cache, and leave in it the prompt and
        the tokens fed back, for the next call. One generation at a time may use a cache."""
        if not prompt:
            raise ValueError("the prompt must contain at least one token")
        if cache is not None and cache.batch_size != num_samples:
            raise ValueError(f"the cache holds {cache.batch_size} rows, not num_samples "
                             f"({num_samples})")
        sampler = SequenceSampler(prompt, num_samples, settings, banned_ids, self.vocab_size,
                                  self.device)
        if not use_cache:
            cache = None
        elif cache is None:
            cache = self.new_cache(num_samples)
        logits = self._prefill(sampler.history, cache)
        done = torch.zeros(num_samples, dtype=torch.bool, device=self.device)
        stops = torch.tensor(list(stop_ids), dtype=torch.long, device=self.device)
        for step in range(settings.max_new_tokens):
            next_ids = sampler.sample(logits)
            yield next_ids
            if len(stop_ids):
                done |= torch.isin(next_ids, stops)
                if bool(done.all()):
                    return
            if step + 1 < settings.max_new_tokens:  # the last token needs no logits
                logits = self._step(sampler.history, cache)

    def _logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Last-position logits (B, V) without the padding rows of the vocabulary."""
        return logits[:, -1, :self.vocab_size].float()

    def _step(self, tokens: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        if cache is None:  # no cache: recompute the whole (cropped) context every step
            return self._logits(self.model(tokens[:, -self.block_size:], logits_to_keep=1))
        if cache.pos >= self.block_size:  # window full: keep the newest half and refill
            return self._forward_window(tokens, cache)
        cache.record(tokens[:, -1:])
        if self.compile:
            logits = self._compiled_step(tokens[:, -1:], cache)
            if logits is not None:
                return logits[:, :self.vocab_size]
        return self._logits(self.model(tokens[:, -1:], kv_cache=cache))

    def _compiled_step(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor | None:
        """Logits from the compiled step, or None if it cannot be used here (then never again)."""
        global _compile_failed
        if self.decoder is not None:
            return self.decoder(idx, cache)
        from gptforge.inference.decode import CompiledDecoder
        try:
            decoder = CompiledDecoder(self.model, self.weight_dtype)
        except ValueError as err:  # an architecture the step does not cover (e.g. MoE)
            log.warning("compiled decoding does not support this model (%s); decoding through "
                        "the model", err)
            self.compile = False
            return None
        if not _compile_failed:
            try:
                logits = decoder(idx, cache)  # compiles on first use
                self.decoder = decoder
                return logits
            except Exception as err:  # no C compiler, unsupported platform, ...: only slower
                first_line = (str(err).strip().splitlines() or [""])[0][:200]
                log.warning("compiled decoding unavailable (%s: %s); decoding through the model",
                            type(err).__name__, first_line)
                _compile_failed = True
        self.compile = False
        return None

    def _prefill(self, tokens: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """Logits after the prompt ``tokens``, running only the part ``cache`` does not hold."""
        n = tokens.size(1)
        if cache is None or n >= self.block_size:  # positions will shift: nothing to reuse
            return self._forward_window(tokens, cache)
        # Keep at least the last prompt token to run: its forward pass gives the next logits.
        start = cache.shared_prefix(tokens[:, :n - 1])
        cache.rewind(start)
        cache.record(tokens[:, start:])
        return self._logits(self.model(tokens[:, start:], kv_cache=cache, logits_to_keep=1))

    def _forward_window(self, tokens: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """Logits after the last ``block_size`` tokens (half of them when refilling a cache)."""
        keep = self.block_size if cache is None or tokens.size(1) < self.block_size \
            else self.block_size // 2
        if cache is not None:
            cache.reset()
            cache.record(tokens[:, -keep:])
        return self._logits(self.model(tokens[:, -keep:], kv_cache=cache, logits_to_keep=1))
