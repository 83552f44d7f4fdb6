"""Log probabilities of tokens under the model, for the API's ``logprobs`` fields.

A token's log probability here is the model's own: ``log_softmax`` of its raw logits at that
position, before temperature, top-k/top-p, the repetition penalty or the chat template's banned
markers reshape the distribution that sampling draws from. That is what vLLM returns by default
and what scoring needs: lm-evaluation-harness computes a continuation's log-likelihood as the sum
of these over its tokens, which must not depend on the sampling settings of the request.

The scores are computed from token ids alone, by the model's forward pass with a KV cache of
their own (:class:`LogprobFollower`), so they do not depend on how the ids were chosen (which
engine, which batch). That costs a second forward pass per generated token, only for requests
that ask for log probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gptforge.inference.kv_cache import KVCache


@dataclass(frozen=True)
class TokenLogprob:
    """``token``'s log probability and the ``top`` most likely tokens there, best first
    (``logprob`` None: the first token of a text, which nothing predicts)."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...]


def logprob_of(logits: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    """``token`` scored against one position's ``logits`` (V,), with the ``top_n`` best."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (V,)
    top = torch.topk(logprobs, min(top_n, logprobs.numel())) if top_n > 0 else None
    pairs = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
    return TokenLogprob(token, float(logprobs[token]), pairs)


@torch.inference_mode()
def prompt_logprobs(model: torch.nn.Module, ids: Sequence[int], vocab_size: int,
                    top_n: int) -> list[TokenLogprob]:
    """Each of ``ids`` scored given the ones before it, in one forward pass; the first has
    nothing before it, so its logprob is None (OpenAI's ``null``)."""
    device = model.lm_head.weight.device
    idx = torch.tensor([list(ids)], dtype=torch.long, device=device)  # (1, T)
    logits = model(idx)[0, :-1, :vocab_size]  # (T-1, V): position t predicts token t+1
    return [TokenLogprob(ids[0], None, ())] + [logprob_of(logits[t], ids[t + 1], top_n)
                                               for t in range(len(ids) - 1)]


class LogprobFollower:
    """Follows a sequence as it grows by one token at a time, scoring each new token.

    ``prompt`` is prefilled at once; :meth:`push` scores the next token against the logits after
    everything before it, and feeds the token in only when the one after it arrives (so the last
    token of a reply costs no forward pass)."""

    def __init__(self, model: torch.nn.Module, prompt: Sequence[int], vocab_size: int,
                 top_n: int):
        self.model, self.vocab_size, self.top_n = model, vocab_size, top_n
        self.device = model.lm_head.weight.device
        self.cache = KVCache.for_model(model, 1)
        self.pending: list[int] = list(prompt)  # fed to the model before the next score

    @torch.inference_mode()
    def push(self, token: int) -> TokenLogprob:
        idx = torch.tensor([self.pending], dtype=torch.long, device=self.device)  # (1, T)
        self.cache.record(idx)
        logits = self.model(idx, kv_cache=self.cache, logits_to_keep=1)[0, -1, :self.vocab_size]
        self.pending = [token]
        return logprob_of(logits, token, self.top_n)
