"""Choosing the next token from logits: pure functions of (logits, settings, generator).

- temperature: divide logits by T; T -> 0 approaches greedy (T == 0 *is* greedy here);
- top-k: keep the k most likely tokens (Fan et al., 2018);
- top-p / nucleus: keep the smallest set whose probability reaches p (Holtzman et al., 2019);
- repetition penalty: make tokens already in the context (prompt and output) less likely
  (Keskar et al., 2019, CTRL).

Every setting in its documented range gives a valid token, however extreme (temperature 1e-300,
a penalty of 1e-300 or 1e300): logits are float32, so the arithmetic is arranged never to make
NaN or +inf. The largest logit is subtracted before dividing by T (the logits then lie in
[-inf, 0], and dividing can only push them towards -inf, which softmax turns into 0); T below
float32's smallest normal number (~1.2e-38), which float32 cannot divide by, is greedy, as the
limit T -> 0 is; a penalised logit saturates at float32's largest value instead of overflowing.
"""

from __future__ import annotations

import torch

_FLOAT32 = torch.finfo(torch.float32)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of tokens in ``seen`` (B, n) by ``penalty``."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    # Keep the factor a normal float32 (1e-300 would round to 0 there and 0 * inf is NaN), and
    # let the products saturate rather than reach +-inf (an inf - inf in softmax is NaN).
    penalty = float(min(max(penalty, _FLOAT32.tiny), _FLOAT32.max))  # ints of any size too
    picked = logits.gather(1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, seen, picked.clamp(_FLOAT32.min, _FLOAT32.max))


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
    """Token ids (B,) drawn from logits (B, V); ``temperature`` below ~1.2e-38 is greedy."""
    if temperature < _FLOAT32.tiny:
        return logits.argmax(dim=-1)
    logits = logits.float().clamp(max=_FLOAT32.max)  # +inf would make inf - inf = NaN below
    # (B, V) in [-inf, 0]: dividing by a tiny T cannot overflow to +inf, only to -inf (a
    # probability of 0); T above float32's range would turn -inf / inf into NaN, so it is capped.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / float(min(temperature, _FLOAT32.max))
    probs = filter_top_p(filter_top_k(logits, top_k), top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
