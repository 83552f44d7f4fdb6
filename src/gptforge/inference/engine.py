"""The generation engine: prefill the prompt, then decode one token at a time.

It works on token ids only; turning text into ids is the tokenizer's job (see ``textgen.py``).
Prefill runs the whole prompt through the model in one pass and fills the KV cache; each decode
step then feeds only the newest token. When the context window is full, the cache is refilled with
the most recent half of the window (a sliding window, amortised over many steps).

``generate`` is a Python generator yielding one tensor of B new ids per step, so callers can
stream output as it is produced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from gptforge.inference.kv_cache import KVCache
from gptforge.inference.sampling import apply_repetition_penalty, sample_next


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None


class Engine:
    def __init__(self, model: torch.nn.Module, vocab_size: int | None = None):
        self.model = model.eval()
        self.block_size = model.config.block_size
        self.vocab_size = vocab_size or model.config.vocab_size
        self.device = model.lm_head.weight.device

    def _logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Last-position logits (B, V) without the padding rows of the vocabulary."""
        return logits[:, -1, :self.vocab_size].float()

    @torch.inference_mode()
    def generate(self, prompt: Sequence[int], settings: SamplingSettings, *,
                 num_samples: int = 1, stop_ids: Sequence[int] = (),
                 use_cache: bool = True) -> Iterator[torch.Tensor]:
        """Yield (num_samples,) new token ids per step until max_new_tokens or all rows stop."""
        if not prompt:
            raise ValueError("the prompt must contain at least one token")
        gen = None
        if settings.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(settings.seed)
        tokens = torch.tensor([list(prompt)] * num_samples, dtype=torch.long, device=self.device)
        cache = KVCache.for_model(self.model, num_samples) if use_cache else None
        logits = self._forward_window(tokens, cache, fresh=True)
        done = torch.zeros(num_samples, dtype=torch.bool, device=self.device)
        stops = torch.tensor(list(stop_ids), dtype=torch.long, device=self.device)
        for _ in range(settings.max_new_tokens):
            logits = apply_repetition_penalty(logits, tokens, settings.repetition_penalty)
            next_ids = sample_next(logits, temperature=settings.temperature,
                                   top_k=settings.top_k, top_p=settings.top_p, generator=gen)
            yield next_ids
            done |= torch.isin(next_ids, stops)
            if bool(done.all()):
                return
            tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
            logits = self._step(tokens, cache)

    def _step(self, tokens: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        if cache is None:  # no cache: recompute the whole (cropped) context every step
            return self._logits(self.model(tokens[:, -self.block_size:], logits_to_keep=1))
        if cache.pos >= self.block_size:  # window full: keep the newest half and refill
            return self._forward_window(tokens, cache, fresh=True)
        return self._logits(self.model(tokens[:, -1:], kv_cache=cache))

    def _forward_window(self, tokens: torch.Tensor, cache: KVCache | None,
                        fresh: bool) -> torch.Tensor:
        keep = self.block_size if cache is None or tokens.size(1) < self.block_size \
            else self.block_size // 2
        if cache is not None and fresh:
            cache.reset()
        window = tokens[:, -keep:]
        return self._logits(self.model(window, kv_cache=cache, logits_to_keep=1))
