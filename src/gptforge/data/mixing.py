"""Mixing sources at chosen rates: take half of one corpus, repeat another twice.

A corpus is often several sources of unequal worth: a large web crawl and a small, clean
collection one wants the model to see more of. ``--input-rate PATH=RATE`` sets how many times
each document of the sources that the ``--input`` item PATH names is taken: ``0.5`` takes half
of them, ``2`` each one twice, ``1.5`` each once and half of them twice, ``0`` none. Which
documents make the fractional part is decided per document by a hash of ``(seed, source,
index)``, so the result is the same on every run, resumed runs included, and needs no pass over
the corpus beforehand (so the count is ``rate * n`` within a few ``sqrt(n)``, not exact).

Rates apply to the documents that pass the quality filters (:mod:`~gptforge.data.filters`), so
a repeated document is never taken for a duplicate of itself; and the copies of a document all
go to the same split, so no text is on both sides of the train/val split.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

from gptforge.data.filters import FilterChain
from gptforge.data.sources import (
    DocumentShape,
    no_text_error,
    resolve_sources,
    source_documents,
)
from gptforge.errors import GptforgeError

MAX_RATE = 1000


def parse_rates(specs: list[str] | None, inputs: list[str], sources: list,
                hf_data_files: list[str] | None = None) -> list[float]:
    """The rate of each of ``sources`` (what ``inputs`` resolved to) from ``PATH=RATE`` specs.

    PATH must be one of ``inputs`` exactly as written; its rate applies to every file it names.
    Sources no spec names have rate 1.
    """
    rates = [1.0] * len(sources)
    named: dict[int, str] = {}
    for spec in specs or []:
        item, rate = _parse_spec(spec, inputs)
        for source in resolve_sources([item], hf_data_files):
            number = sources.index(source)
            if number in named and named[number] != item:
                raise GptforgeError(f"--input-rate {spec}: {source} already has a rate from "
                                    f"--input-rate {named[number]}=...; give each file one rate")
            rates[number], named[number] = rate, item
    return rates


def _parse_spec(spec: str, inputs: list[str]) -> tuple[str, float]:
    item, equals, text = spec.rpartition("=")
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if not equals or not 0 <= rate <= MAX_RATE:  # also refuses nan and inf
        raise GptforgeError(f"--input-rate {spec!r}: write PATH=RATE, RATE a number from 0 to "
                            f"{MAX_RATE}, e.g. --input-rate books.jsonl=2")
    if item not in inputs:
        raise GptforgeError(f"--input-rate {spec!r}: {item!r} is not one of the --input items "
                            f"({', '.join(inputs)}); write it exactly as given to --input")
    return item, rate


def copies(rate: float, seed: int, source: int, index: int) -> int:
    """How many times document ``index`` of source number ``source`` is taken at ``rate``."""
    whole = math.floor(rate)
    if rate == whole:
        return whole
    digest = hashlib.blake2b(f"{seed}:{source}:{index}".encode(), digest_size=8).digest()
    return whole + (int.from_bytes(digest, "little") / 2**64 < rate - whole)


class Mixture:
    """The documents of ``sources``, filtered by a chain, each taken ``copies`` times.

    One mixture is one pass over the corpus (the chain remembers what it saw); :attr:`read`
    and :attr:`taken` count, per source, the documents that passed the filters and the copies
    taken of them.
    """

    def __init__(self, sources: list, rates: list[float], seed: int, shape: DocumentShape,
                 chain: FilterChain):
        self.sources, self.rates, self.seed = sources, rates, seed
        self.shape, self.chain = shape, chain
        self.read = [0] * len(sources)
        self.taken = [0] * len(sources)

    def __iter__(self) -> Iterator[tuple[str, str, int]]:
        """``(label, text, copies)`` for every document taken at least once."""
        for number, source in enumerate(self.sources):
            documents = self.chain(source_documents(source, self.shape),
                                   check_empty=False)
            for index, (label, text) in enumerate(documents):
                count = copies(self.rates[number], self.seed, number, index)
                self.read[number] += 1
                self.taken[number] += count
                if count:
                    yield label, text, count
        if self.chain.read == 0:
            raise no_text_error(self.sources)
        self.chain.check_not_empty()
        if sum(self.taken) == 0:
            raise GptforgeError("the --input-rate settings take no document; give a source a "
                                "rate above 0")

    def report(self) -> list[dict]:
        """Per source with a rate other than 1: documents after filtering, and copies taken."""
        return [{"source": str(source), "rate": rate, "documents": read, "taken": taken}
                for source, rate, read, taken in zip(self.sources, self.rates, self.read,
                                                     self.taken, strict=True) if rate != 1]
