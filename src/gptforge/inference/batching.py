"""Continuous batching on token ids: many sequences decoded together, each joining and leaving
between two steps.

A server that decodes one request at a time leaves most of the hardware idle: a decode step
reads every weight to produce one token per row, and reading them for 16 rows costs hardly more
than for one. Continuous batching (Yu et al., 2022, "Orca",
https://www.usenix.org/conference/osdi22/presentation/yu) keeps one batch running and changes
its rows between steps: a new request is prefilled into a free row and takes part in the next
step, a finished one frees its row at once, so no request waits for the longest one of a batch.

:class:`BatchDecoder` owns a :class:`~gptforge.inference.kv_cache.SlotCache` with one row per
slot and does three things: prefill a prompt into a slot (through the engine's own prefill, so
the logits are those of ``Engine.generate``), copy a slot (n choices of one prompt), and decode
one token for any set of slots, whose lengths may all differ (the model masks each row to its
own positions). A lone row decodes through the engine's step, exactly as ``Engine.generate``.
Each request's rows are sampled by its own :class:`~gptforge.inference.engine.SequenceSampler`,
the one ``Engine.generate`` uses (penalties over the request's own tokens, banned ids,
temperature/top-k/top-p with its own seeded generator), so a request's tokens do not depend on
what else is running (up to float rounding of the batched matrix products).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gptforge.inference.engine import Engine
from gptforge.inference.kv_cache import SlotCache


class BatchDecoder:
    """``slots`` rows of KV cache on ``engine``'s model; one thread at a time may use it."""

    def __init__(self, engine: Engine, slots: int):
        self.engine, self.slots = engine, slots
        dtype = engine.weight_dtype if engine.compile else None
        self.cache = SlotCache.for_model(engine.model, slots, dtype)

    def best_slot(self, free: Sequence[int], prompt: Sequence[int]) -> int:
        """The free slot holding the longest beginning of ``prompt`` (lowest slot on a tie)."""
        ids = torch.tensor([list(prompt)], device=self.engine.device)
        return max(free, key=lambda s: (self.cache.rows[s].shared_prefix(ids), -s))

    @torch.inference_mode()
    def prefill(self, slot: int, prompt: Sequence[int]) -> torch.Tensor:
        """Logits (1, V) after ``prompt`` in ``slot``; what the slot already holds of the
        prompt's beginning is kept."""
        tokens = torch.tensor([list(prompt)], dtype=torch.long, device=self.engine.device)
        return self.engine._prefill(tokens, self.cache.rows[slot])

    def copy(self, src: int, dst: int) -> None:
        self.cache.copy_row(src, dst)

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """Logits (len(slots), V) after feeding ``tokens`` (len(slots),), one per slot."""
        idx = tokens.view(-1, 1).to(self.engine.device)  # (A, 1)
        if len(slots) == 1:  # Engine.generate's own step (and its compiled one, if on)
            return self.engine._step(idx, self.cache.rows[slots[0]])
        step = self.cache.step(slots, idx)
        logits = self.engine.model(idx, kv_cache=step, positions=step.positions,
                                   logits_to_keep=1)
        step.advance()
        return self.engine._logits(logits)


