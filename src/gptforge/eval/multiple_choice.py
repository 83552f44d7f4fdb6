"""Multiple-choice tasks scored by log-likelihood, as lm-evaluation-harness scores HellaSwag,
ARC and PIQA and nanoGPT's ``hellaswag.py`` does.

An example is a context and several candidate continuations, one of them right. The model is not
asked to generate anything: for each choice it scores the continuation's tokens given the
context, ``log p(continuation | context) = sum_t log p(c_t | context, c_<t)``, and the choice
with the highest score is its answer. Two accuracies are reported:

- ``acc``: the choice with the highest total log-likelihood. Long continuations are penalised
  (every token costs probability), so it prefers short answers.
- ``acc_norm``: the choice with the highest log-likelihood per UTF-8 byte of the answer (the
  continuation without the whitespace that separates it from the context), which removes that
  length bias without depending on the tokenizer. For ASCII text this is lm-evaluation-harness's
  ``acc_norm``, which divides by the answer's characters.

Each has the standard error of a proportion, ``sqrt(p (1 - p) / N)``.

Tokenizing the continuation (:func:`split_continuation`): a continuation is scored on the tokens
it gets *in context*, because that is how the model saw such text in training. Whitespace at the
end of the context is first moved to the front of the continuation (``"Answer: " + "Paris"`` is
scored as ``"Answer:" + " Paris"``), because BPE vocabularies attach a space to the word after
it. Then the context and the whole text are encoded: when the whole text's tokens start with the
context's tokens, the rest are the continuation's; when a BPE merge crosses the boundary (the
context ``"... cat"`` and the continuation ``"s sat"``, where the whole text has a token
``" cats"``), the context and the continuation are encoded separately and joined, so that every
choice is scored on exactly its own text after exactly the same context tokens.

Sequences longer than the model's context lose tokens from the left (the start of the context).
A choice that alone is longer than the context cannot be scored: its example is skipped (with a
warning), the others are scored, and the results count the skipped ones.
Every (example, choice) pair is one row; rows are sorted by length and batched, padded on the
right, which a causal model never looks at.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from gptforge.errors import GptforgeError
from gptforge.model.loss import IGNORE_INDEX, target_log_probs
from gptforge.runtime.device import Precision

log = logging.getLogger(__name__)
SKIPPED_LISTED = 10  # where the first skipped examples are, in the results


@dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...]
    label: int  # index of the right choice
    where: str = ""  # file:line or dataset row, for error messages
    group: str = ""  # the subject of an exam question: accuracy is also reported per group


class Continuation(NamedTuple):
    context_ids: list[int]
    ids: list[int]  # the continuation's tokens, scored
    nbytes: int  # UTF-8 bytes of the answer: the continuation without leading whitespace


def split_continuation(tokenizer, context: str, continuation: str) -> Continuation:
    """The tokens of ``context`` and of ``continuation`` following it (see the module doc).

    An empty context becomes the end-of-text token: the continuation starts a document.
    """
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    context_ids = tokenizer.encode(context) if context else []
    whole = tokenizer.encode(context + continuation)
    if len(whole) > len(context_ids) and whole[:len(context_ids)] == context_ids:
        ids = whole[len(context_ids):]
    else:  # a token spans the boundary
        ids = tokenizer.encode(continuation)
    answer = continuation.lstrip() or continuation  # the separator is not part of the answer
    return Continuation(context_ids or [tokenizer.eos_id], ids, len(answer.encode()))


class Request(NamedTuple):
    ids: list[int]  # context and continuation, cut from the left to block_size + 1 tokens
    scored: int  # the last `scored` tokens are the continuation's
    nbytes: int


class ChoiceTooLong(GptforgeError):
    """A choice with more tokens than the model's context: the example cannot be scored."""


def example_requests(tokenizer, example: Example, block_size: int) -> list[Request]:
    """One request per choice of ``example``."""
    requests = []
    for i, choice in enumerate(example.choices):
        try:
            cont = split_continuation(tokenizer, example.context, choice)
        except GptforgeError as err:
            raise GptforgeError(f"{example.where}: {err}") from None
        if not cont.ids:
            raise GptforgeError(f"{example.where}: choice {i} is empty")
        if len(cont.ids) > block_size:
            raise ChoiceTooLong(
                f"{example.where}: choice {i} is {len(cont.ids)} tokens long, more than "
                f"the model's context of {block_size} tokens; it cannot be scored")
        ids = (cont.context_ids + cont.ids)[-(block_size + 1):]
        requests.append(Request(ids, len(cont.ids), cont.nbytes))
    return requests


def build_requests(tokenizer, examples: Sequence[Example], block_size: int) -> list[Request]:
    """One request per choice of every example, in order."""
    return [r for example in examples for r in example_requests(tokenizer, example, block_size)]


def scorable_requests(tokenizer, examples: Sequence[Example], block_size: int
                      ) -> tuple[list[Example], list[Request], list[str]]:
    """The examples that can be scored, their requests, and where the others are: an example
    with a choice longer than the context is left out, not the whole task."""
    kept, requests, skipped = [], [], []
    for example in examples:
        try:
            requests += example_requests(tokenizer, example, block_size)
        except ChoiceTooLong as err:
            log.warning("%s; the example is skipped", err)
            skipped.append(example.where)
            continue
        kept.append(example)
    return kept, requests, skipped


@torch.no_grad()
def score_requests(model: torch.nn.Module, requests: Sequence[Request], *,
                   precision: Precision, batch_size: int, pad_id: int,
                   progress: bool = False) -> list[float]:
    """The log-likelihood (nats) of each request's continuation, in the order given."""
    from tqdm import tqdm

    device = precision.device
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].ids))
    scores = [0.0] * len(requests)
    for start in tqdm(range(0, len(order), batch_size), disable=not progress, leave=False,
                      unit="batch"):
        rows = [requests[i] for i in order[start:start + batch_size]]
        T = len(rows[0].ids) - 1  # the longest row comes first
        x = torch.full((len(rows), T), pad_id, dtype=torch.long)
        y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        for r, req in enumerate(rows):
            n = len(req.ids) - 1
            x[r, :n] = torch.tensor(req.ids[:-1])
            y[r, n - req.scored:n] = torch.tensor(req.ids[-req.scored:])
        x, y = x.to(device), y.to(device)
        with precision.autocast():
            logits = model(x)
        row_scores = target_log_probs(logits, y).sum(dim=1)  # (B,)
        for i, score in zip(order[start:start + batch_size], row_scores.tolist()):
            scores[i] = score
    return scores


@dataclass(frozen=True)
class MCResult:
    examples: int
    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float
    random_baseline: float  # the expected acc of guessing: the mean of 1 / number of choices
    groups: dict = field(default_factory=dict)  # {group: {"examples": n, "acc": acc}}
    skipped: tuple[str, ...] = ()  # where the examples are that could not be scored

    def to_dict(self) -> dict:
        return {"examples": self.examples, "acc": self.acc, "acc_stderr": self.acc_stderr,
                "acc_norm": self.acc_norm, "acc_norm_stderr": self.acc_norm_stderr,
                "random_baseline": self.random_baseline, "skipped": len(self.skipped),
                "skipped_examples": list(self.skipped[:SKIPPED_LISTED]),
                **({"groups": self.groups} if self.groups else {})}


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])  # the first of equal maxima


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def accuracy(examples: Sequence[Example], scores: Sequence[float],
             nbytes: Sequence[int]) -> MCResult:
    """acc and acc_norm from the flat per-choice ``scores`` and continuation ``nbytes``."""
    right = right_norm = pos = 0
    groups: dict[str, list[int]] = {}  # group -> [examples, right]
    for example in examples:
        k = len(example.choices)
        s, b = scores[pos:pos + k], nbytes[pos:pos + k]
        correct = _argmax(s) == example.label
        right += correct
        right_norm += _argmax([si / bi for si, bi in zip(s, b)]) == example.label
        pos += k
        if example.group:
            counts = groups.setdefault(example.group, [0, 0])
            counts[0] += 1
            counts[1] += correct
    n = len(examples)
    acc, acc_norm = right / n, right_norm / n
    baseline = sum(1 / len(e.choices) for e in examples) / n
    by_group = {g: {"examples": m, "acc": r / m} for g, (m, r) in sorted(groups.items())}
    return MCResult(n, acc, _stderr(acc, n), acc_norm, _stderr(acc_norm, n), baseline, by_group)


def evaluate_examples(model: torch.nn.Module, tokenizer, examples: Sequence[Example], *,
                      precision: Precision, batch_size: int = 8,
                      progress: bool = False) -> MCResult:
    """acc and acc_norm of ``model`` on ``examples``."""
    if not examples:
        raise GptforgeError("no examples to evaluate")
    block_size = model.config.block_size
    kept, requests, skipped = scorable_requests(tokenizer, examples, block_size)
    if not kept:
        raise GptforgeError(f"all {len(examples)} examples have a choice longer than the "
                            f"model's context of {block_size} tokens (the first: {skipped[0]}); "
                            "none can be scored")
    scores = score_requests(model, requests, precision=precision, batch_size=batch_size,
                            pad_id=tokenizer.pad_id, progress=progress)
    result = accuracy(kept, scores, [r.nbytes for r in requests])
    return replace(result, skipped=tuple(skipped))
