"""Exact-duplicate document removal: a document byte-identical to an earlier one is dropped.

Web crawls and scraped collections repeat documents verbatim (boilerplate pages, mirrors, the same
file in two folders). Each copy costs training compute, weights the model towards that text, and,
when one copy lands in train and another in val, makes the val loss measure memorisation. The
filter runs before the train/val split, so a duplicate can never end up on the other side.

Each document is remembered by a 16-byte BLAKE2b digest of its UTF-8 text in a Python ``set``:
about 85 bytes of memory per distinct document (the digest object plus its set slot), so 1 GB per
12 million documents. With 128-bit digests, a false match among a billion documents has a
probability below 10^-20. Only exact copies are caught; near-duplicates are caught by
:class:`~gptforge.data.filters.NearDuplicateFilter`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

DIGEST_BYTES = 16


class DuplicateFilter:
    """Pass ``(label, text)`` documents through, dropping repeats; counts what it dropped.

    One filter is one pass over the corpus: a second pass needs a new filter.
    """

    def __init__(self) -> None:
        self._seen: set[bytes] = set()
        self.duplicates_removed = 0

    def __call__(self, documents: Iterable[tuple[str, str]]) -> Iterator[tuple[str, str]]:
        for label, text in documents:
            if self.keep(text):
                yield label, text

    def keep(self, text: str) -> bool:
        """Whether ``text`` is new; it is remembered, a repeat is counted."""
        # surrogatepass: a lone surrogate is reported by the encoder, with the document named
        key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"),
                              digest_size=DIGEST_BYTES).digest()
        if key in self._seen:
            self.duplicates_removed += 1
            return False
        self._seen.add(key)
        return True
