"""Quality filters: drop documents that would teach the model noise, and count what each dropped.

Scraped and converted corpora carry documents no model should learn from: empty stubs, text
decoded with the wrong encoding (full of U+FFFD replacement or control characters), tables of
punctuation, the same page many times over, nearly the same page (a counter or a date changed),
and text in another script than the one wanted. Each filter here is one test, switched on by its
own option, applied to every document before the train/val split (so the split is that of the
filtered corpus). :class:`FilterChain` runs them in a fixed order, cheapest first, and counts
each removed document once, under the first filter that refused it; its :meth:`report` goes into
the manifest and the summary. A chain that removes every document stops prepare with one line
naming the filter that removed the most.

Near-duplicates are found with MinHash over character shingles (Broder, "On the resemblance and
containment of documents", 1997) and locality-sensitive hashing by bands (Leskovec, Rajaraman and
Ullman, *Mining of Massive Datasets*, ch. 3.4): see :class:`NearDuplicateFilter`.
"""

from __future__ import annotations

import functools
import hashlib
import re
import sys
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from gptforge.data.dedup import DuplicateFilter
from gptforge.errors import GptforgeError

# Characters that mean the text was damaged on its way here: U+FFFD (what a decoder writes for
# bytes it could not decode) and C0/C1 control characters other than tab, newline and CR.
_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd]")
_LETTER = re.compile(r"[^\W\d_]")  # a Unicode letter: a word character that is no digit or _
_WHITESPACE = re.compile(r"\s")
# Letters of each script, by Unicode block ranges (the blocks' letters; a few signs in them are
# not letters, which is why a share is clipped to 1).
_SCRIPT_RANGES = {
    "latin": "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff",
    "greek": "\u0370-\u03ff\u1f00-\u1fff",
    "cyrillic": "\u0400-\u052f",
    "hebrew": "\u0590-\u05ff",
    "arabic": "\u0600-\u06ff\u0750-\u077f",
    "devanagari": "\u0900-\u097f",
    "thai": "\u0e00-\u0e7f",
    "han": "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f",
    "kana": "\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9d",
    "hangul": "\u1100-\u11ff\u3130-\u318f\uac00-\ud7af",
}
_SCRIPT_RANGES["cjk"] = _SCRIPT_RANGES["han"] + _SCRIPT_RANGES["kana"] + _SCRIPT_RANGES["hangul"]
SCRIPTS = tuple(sorted(_SCRIPT_RANGES))


class MinLength:
    """Keep documents of at least ``min_chars`` characters."""

    name = "min_chars"

    def __init__(self, min_chars: int):
        self.min_chars = min_chars

    def keep(self, text: str) -> bool:
        return len(text) >= self.min_chars


class MaxBadCharShare:
    """Keep documents in which replacement and control characters are at most ``share``."""

    name = "max_bad_char_share"

    def __init__(self, share: float):
        self.share = share

    def keep(self, text: str) -> bool:
        return len(_BAD_CHARS.findall(text)) <= self.share * len(text)


class MaxPunctuationShare:
    """Keep documents in which punctuation (Unicode category P*) is at most ``share`` of the
    characters that are not white space."""

    name = "max_punctuation_share"

    def __init__(self, share: float):
        self.share = share
        self._punctuation = punctuation_pattern()

    def keep(self, text: str) -> bool:
        visible = len(text) - len(_WHITESPACE.findall(text))
        return len(self._punctuation.findall(text)) <= self.share * visible


class MinScriptShare:
    """Keep documents in which letters of ``script`` are at least ``share`` of all letters."""

    name = "min_script_share"

    def __init__(self, script: str, share: float):
        self.script, self.share = script, share
        self._script = re.compile(f"[{_SCRIPT_RANGES[script]}]")

    def keep(self, text: str) -> bool:
        letters = len(_LETTER.findall(text))
        if letters == 0:
            return self.share == 0
        return min(len(self._script.findall(text)), letters) >= self.share * letters


@functools.cache
def punctuation_pattern() -> re.Pattern:
    """A character class of every Unicode punctuation character (categories Pc Pd Ps Pe Pi Pf
    Po), built once from :mod:`unicodedata`; ``re`` has no ``\\p{P}``."""
    ranges: list[str] = []
    start = previous = None
    for code in range(sys.maxunicode + 1):
        if unicodedata.category(chr(code)).startswith("P"):
            if previous is not None and code == previous + 1:
                previous = code
                continue
            if start is not None:
                ranges.append(_range(start, previous))
            start = previous = code
    ranges.append(_range(start, previous))
    return re.compile(f"[{''.join(ranges)}]")


def _range(first: int, last: int) -> str:
    return re.escape(chr(first)) + ("" if first == last else "-" + re.escape(chr(last)))


class ExactDuplicates:
    """Drop a document identical to an earlier one (see :mod:`~gptforge.data.dedup`)."""

    name = "duplicate"

    def __init__(self) -> None:
        self._filter = DuplicateFilter()

    def keep(self, text: str) -> bool:
        return self._filter.keep(text)


# --------------------------------------------------------------------------- MinHash and LSH


def shingle_hashes(text: str, size: int) -> np.ndarray:
    """The distinct 32-bit hashes of the ``size``-character shingles of ``text``.

    Case and runs of white space are normalised first, so a re-wrapped or re-cased copy is still
    a copy. Each shingle is hashed as a polynomial in its code points mod 2^64 (an odd base),
    for all shingles at once with numpy, then mixed with SplitMix64's finaliser (Steele, Lea and
    Flood, 2014) and its top 32 bits kept. The mixing matters: without it, shingles that differ
    in one character get related hashes, and the MinHash estimates came out ~0.06 too high.
    A text shorter than ``size`` is one shingle.
    """
    normal = " ".join(text.lower().split())
    points = np.frombuffer(normal.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(points) == 0:
        return np.zeros(0, dtype=np.uint64)
    size = min(size, len(points))
    count = len(points) - size + 1
    hashes = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):  # arithmetic mod 2^64 is the point
        for offset in range(size):
            hashes = hashes * np.uint64(0x9E3779B97F4A7C15) + points[offset:offset + count]
        hashes = _splitmix64(hashes)
    return np.unique(hashes >> np.uint64(32))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class MinHasher:
    """``perms`` MinHash functions over shingle hashes, seeded, so runs agree.

    Hash function i maps a 32-bit shingle hash x to the top 32 bits of ``(a_i x + b_i) mod
    2^64`` with random 64-bit a_i, b_i: the multiply-add-shift scheme, a universal family
    (Dietzfelbinger, 1996) that numpy computes without overflow checks. The fraction of equal
    entries in two signatures estimates the Jaccard similarity of the shingle sets, with
    standard deviation ``sqrt(J (1 - J) / perms)``.
    """

    def __init__(self, perms: int = 128, shingle_chars: int = 5, seed: int = 0):
        self.perms, self.shingle_chars = perms, shingle_chars
        rng = np.random.default_rng(seed)
        a, b = rng.integers(0, 2**64, size=(2, perms, 1), dtype=np.uint64)  # (perms, 1) each
        self._a, self._b = a, b

    def signature(self, text: str) -> np.ndarray:
        """The (perms,) uint32 MinHash signature of ``text``."""
        shingles = shingle_hashes(text, self.shingle_chars)
        signature = np.full(self.perms, np.iinfo(np.uint32).max, dtype=np.uint64)
        for start in range(0, len(shingles), 4096):  # bounded memory for long documents
            block = shingles[None, start:start + 4096]  # (1, n)
            with np.errstate(over="ignore"):
                values = (self._a * block + self._b) >> np.uint64(32)  # (perms, n)
            signature = np.minimum(signature, values.min(axis=1))
        return signature.astype(np.uint32)


@functools.cache
def lsh_bands(threshold: float, perms: int) -> tuple[int, int]:
    """``(bands, rows)`` with ``bands * rows <= perms`` whose S-curve ``1 - (1 - s^r)^b`` best
    separates similarity ``threshold``: it minimises the area of false positives below the
    threshold plus false negatives above it (MMDS ch. 3.4.3)."""
    similarity = np.linspace(0.0, 1.0, 501)
    below = similarity < threshold
    best = (np.inf, 1, perms)
    for bands in range(1, perms + 1):
        for rows in range(1, perms // bands + 1):
            caught = 1.0 - (1.0 - similarity ** rows) ** bands
            error = np.trapezoid(np.where(below, caught, 1.0 - caught), similarity)
            best = min(best, (float(error), bands, rows))
    return best[1], best[2]


class NearDuplicateFilter:
    """Drop a document whose MinHash signature agrees with an earlier kept one's in a whole band.

    The signature is cut into ``bands`` bands of ``rows`` entries; two documents of Jaccard
    similarity s share at least one band with probability ``1 - (1 - s^r)^b``, an S-curve that
    rises steeply around ``threshold`` (see :func:`lsh_bands`). Only band keys of kept documents
    are remembered (one 64-bit key per band, in a set, about 90 bytes each), never texts or
    signatures; a matching band is taken as a duplicate without computing the similarity, so a
    pair just below the threshold is dropped now and then, and one just above kept.
    """

    name = "near_duplicate"

    def __init__(self, threshold: float, shingle_chars: int = 5, perms: int = 128,
                 seed: int = 0):
        self.hasher = MinHasher(perms, shingle_chars, seed)
        self.bands, self.rows = lsh_bands(threshold, perms)
        self._seen: set[bytes] = set()

    def band_keys(self, text: str) -> list[bytes]:
        signature = self.hasher.signature(text)
        return [hashlib.blake2b(signature[i * self.rows:(i + 1) * self.rows].tobytes(),
                                digest_size=8, person=i.to_bytes(4, "little")).digest()
                for i in range(self.bands)]

    def keep(self, text: str) -> bool:
        keys = self.band_keys(text)
        if any(key in self._seen for key in keys):
            return False
        self._seen.update(keys)
        return True


# --------------------------------------------------------------------------- the chain


@dataclass(frozen=True)
class FilterSettings:
    """Which filters to run; None (or False) leaves a filter off."""

    min_chars: int | None = None
    max_bad_char_share: float | None = None
    max_punctuation_share: float | None = None
    min_script_share: str | None = None  # "SCRIPT:SHARE", e.g. "cjk:0.5"
    dedup: bool = True
    near_dedup: float | None = None  # Jaccard threshold
    near_dedup_shingle: int = 5
    near_dedup_perms: int = 128

    def check(self) -> None:
        """Refuse settings out of range, each in one line naming its option."""
        if self.min_chars is not None and self.min_chars < 1:
            raise GptforgeError(f"--min-chars must be at least 1, got {self.min_chars}")
        for option, share in (("--max-bad-char-share", self.max_bad_char_share),
                              ("--max-punctuation-share", self.max_punctuation_share)):
            if share is not None and not 0 <= share <= 1:
                raise GptforgeError(f"{option} must be between 0 and 1, got {share}")
        if self.min_script_share is not None:
            parse_script_share(self.min_script_share)
        if self.near_dedup is not None and not 0 < self.near_dedup <= 1:
            raise GptforgeError(f"--near-dedup must be a Jaccard similarity in (0, 1], got "
                                f"{self.near_dedup}")
        if self.near_dedup_shingle < 1 or self.near_dedup_perms < 1:
            raise GptforgeError("--near-dedup-shingle and --near-dedup-perms must be at least 1")

    def build(self) -> FilterChain:
        """A new chain (filters remember what they saw: one chain per pass over the corpus)."""
        filters: list = []
        if self.min_chars is not None:
            filters.append(MinLength(self.min_chars))
        if self.max_bad_char_share is not None:
            filters.append(MaxBadCharShare(self.max_bad_char_share))
        if self.max_punctuation_share is not None:
            filters.append(MaxPunctuationShare(self.max_punctuation_share))
        if self.min_script_share is not None:
            filters.append(MinScriptShare(*parse_script_share(self.min_script_share)))
        if self.dedup:
            filters.append(ExactDuplicates())
        if self.near_dedup is not None:
            filters.append(NearDuplicateFilter(self.near_dedup, self.near_dedup_shingle,
                                               self.near_dedup_perms))
        return FilterChain(filters)


def parse_script_share(spec: str) -> tuple[str, float]:
    """``"cjk:0.5"`` as ``("cjk", 0.5)``."""
    script, _, share = spec.partition(":")
    try:
        value = float(share)
    except ValueError:
        value = -1.0
    if script not in _SCRIPT_RANGES or not 0 <= value <= 1:
        raise GptforgeError(f"--min-script-share {spec!r}: write SCRIPT:SHARE with SCRIPT one of "
                            f"{', '.join(SCRIPTS)} and SHARE between 0 and 1, e.g. cjk:0.5")
    return script, value


class FilterChain:
    """Pass ``(label, text)`` documents through every filter in turn; counts what each removed."""

    def __init__(self, filters: list):
        self.filters = filters
        self.read = 0
        self.removed = {f.name: 0 for f in filters}

    def __call__(self, documents: Iterable[tuple[str, str]],
                 check_empty: bool = True) -> Iterator[tuple[str, str]]:
        """The documents that pass; at the end, an error if none did (unless ``check_empty``
        is False: a caller that feeds the chain several streams checks after the last)."""
        for label, text in documents:
            self.read += 1
            refused = next((f for f in self.filters if not f.keep(text)), None)
            if refused is not None:
                self.removed[refused.name] += 1
                continue
            yield label, text
        if check_empty:
            self.check_not_empty()

    def check_not_empty(self) -> None:
        """One line naming the filter that removed the most, when documents came in but none
        passed."""
        if self.read > 0 and sum(self.removed.values()) == self.read:
            worst = max(self.removed, key=self.removed.__getitem__)
            raise GptforgeError(f"the filters removed all {self.read:,} documents, "
                                f"{self.removed[worst]:,} of them by {option_name(worst)}; "
                                "loosen that setting")

    def report(self) -> dict:
        """``{"documents": read, "kept": n, "removed": {filter: {"documents", "share"}}}``."""
        removed = {name: {"documents": count, "share": round(count / max(self.read, 1), 6)}
                   for name, count in self.removed.items()}
        return {"documents": self.read, "kept": self.read - sum(self.removed.values()),
                "removed": removed}


def option_name(filter_name: str) -> str:
    """The command-line option that sets a filter (most are named after their option)."""
    special = {"duplicate": "--dedup", "near_duplicate": "--near-dedup"}
    return special.get(filter_name, "--" + filter_name.replace("_", "-"))
