"""Metrics of generated text: overlap with references, diversity, and looping.

- **BLEU** (Papineni et al. 2002) and **chrF** (Popović 2015), corpus-level, computed by
  ``sacrebleu`` (Post 2018, "A Call for Clarity in Reporting BLEU Scores") so the numbers are
  the standard ones: word n-gram precision with a brevity penalty, and character n-gram
  F-score. 0 to 100. Each hypothesis is the first sample of an example; its references are the
  example's answers (examples may have different numbers of them).
- **distinct-n** (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural
  Conversation Models"): unique n-grams / all n-grams over every generation together, for
  n = 1, 2. Low values mean the model says the same things again and again.
- **repetition_4** ("rep-n" of Welleck et al. 2020, "Neural Text Generation with Unlikelihood
  Training"): within each generation, the share of its 4-grams that are repeats
  (``1 - unique / total``), averaged over generations that have any 4-gram. A model stuck in a
  loop scores near 1; ordinary prose near 0.

The n-gram metrics count words: runs of letters/digits, single punctuation marks, and single
CJK characters (Chinese and Japanese have no spaces between words).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

WORD = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]|[^\W\u3040-\u30ff\u3400-\u9fff"
                  r"\uf900-\ufaff]+|[^\w\s]")


def words(text: str) -> list[str]:
    return WORD.findall(text)


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Unique n-grams / all n-grams over ``texts``; None when they hold no n-gram."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else None


def repetition_rate(texts: Sequence[str], n: int = 4) -> float | None:
    """Mean over ``texts`` of the share of repeated n-grams within each; None when no text
    has an n-gram."""
    rates = []
    for text in texts:
        grams = ngrams(words(text), n)
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else None


def corpus_bleu_chrf(hypotheses: Sequence[str],
                     references: Sequence[Sequence[str]]) -> tuple[float, float] | None:
    """Corpus BLEU and chrF with sacrebleu's defaults; None when sacrebleu is not installed."""
    try:
        import sacrebleu
    except ImportError:
        return None
    width = max(len(r) for r in references)
    # sacrebleu wants one stream per reference position; None where an example has fewer.
    streams = [[r[i] if i < len(r) else None for r in references] for i in range(width)]
    return (sacrebleu.corpus_bleu(list(hypotheses), streams).score,
            sacrebleu.corpus_chrf(list(hypotheses), streams).score)


def text_metrics(outputs: Sequence[Sequence[str]],
                 references: Sequence[Sequence[str]]) -> dict[str, float | None]:
    """BLEU, chrF (first sample of each example), distinct-1/2 and repetition_4 (all samples)."""
    everything = [t for texts in outputs for t in texts]
    overlap = corpus_bleu_chrf([texts[0] for texts in outputs], references)
    bleu, chrf = overlap if overlap is not None else (None, None)
    return {"bleu": bleu, "chrf": chrf, "distinct_1": distinct_n(everything, 1),
            "distinct_2": distinct_n(everything, 2),
            "repetition_4": repetition_rate(everything, 4)}
