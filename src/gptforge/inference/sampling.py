"""Choosing the next token from logits: pure functions of (logits, settings, generator).

- temperature: divide logits by T; T -> 0 approaches greedy (T == 0 *is* greedy here);
- top-k: keep the k most likely tokens (Fan et al., 2018);
- top-p / nucleus: keep the smallest set whose probability reaches p (Holtzman et al., 2019);
- repetition penalty: make tokens already in the context (prompt and output) less likely
  (Keskar et al., 2019, CTRL).
"""

from __future__ import annotations

import torch


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of tokens in ``seen`` (B, n) by ``penalty``."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, seen, picked)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token if the tokens before it already reach p; the most likely token always stays,
    # even for p <= 0 (otherwise every logit would be -inf and the softmax NaN).
    drop = probs.cumsum(dim=-1) - probs >= p
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return logits.scatter(1, order, sorted_logits)


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids (B,) drawn from logits (B, V)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = filter_top_p(filter_top_k(logits.float() / temperature, top_k), top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
