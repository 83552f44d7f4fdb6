"""Byte-level BPE tokenizer (the GPT-2 scheme), built on Hugging Face ``tokenizers``.

Text is first turned into UTF-8 bytes, each byte shown as a printable character, and BPE merges
are learned over those. Because all 256 bytes are in the base alphabet, any string at all can be
encoded and decoded back exactly (Chinese, emoji, odd whitespace), with no unknown token. It is the
sensible default for English and code; for Chinese and Japanese, SentencePiece usually compresses
better at the same vocabulary size.

Saved as ``tokenizer.json`` in the ``tokenizers`` library's own format, so other tools can load it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from gptforge.errors import GptforgeError
from gptforge.tokenizer.base import (
    SPECIAL_TOKENS,
    NotGptforgeTokenizer,
    Tokenizer,
    TrainOptions,
    check_unicode,
)

DEFAULT_VOCAB_SIZE = 4096
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
# The trainer gets text in pieces of at most this many characters, so that one huge document
# (a whole corpus in a single .txt file) does not balloon its memory.
TRAIN_PIECE_CHARS = 1 << 20
# Runs of non-space (or of space) longer than this are cut into words of this length for
# training. The trainer's merge step is quadratic in a word's length: a 200 kB line of letters
# without a space took 17 s, a 50 MB one would never end. Natural words are far shorter, so the
# merges learned are those of the whole text.
MAX_TRAIN_WORD_CHARS = 64
_LONG_RUN = re.compile(rf"\S{{{MAX_TRAIN_WORD_CHARS + 1},}}|\s{{{MAX_TRAIN_WORD_CHARS + 1},}}")


class BPETokenizer(Tokenizer):
    kind = "bpe"
    file_name = "tokenizer.json"

    def __init__(self, hf_tokenizer: Any, source: str = "tokenizer"):
        specials = {t: hf_tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in specials.items() if i is None]
        if missing:
            raise NotGptforgeTokenizer(f"{source}: lacks the special tokens "
                                       f"{', '.join(missing)}")
        super().__init__(specials)
        self._hf = hf_tokenizer

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int | None = None, *,
              options: TrainOptions = TrainOptions(), progress: bool = False) -> BPETokenizer:
        from tokenizers import AddedToken, decoders, pre_tokenizers, trainers

        vocab_size = vocab_size or DEFAULT_VOCAB_SIZE
        if vocab_size < MIN_VOCAB_SIZE:
            raise GptforgeError(
                f"--vocab-size {vocab_size} is too small for bpe: it needs at least "
                f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens); "
                "raise --vocab-size")
        hf = _untrained(options)
        hf.decoder = decoders.ByteLevel()
        # User symbols come right after the special tokens; not "special", so that decoding
        # always writes them and they count as text.
        symbols = [AddedToken(s, special=False, normalized=False) for s in options.user_symbols]
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS) + symbols,  # first, so they get ids 0..5, ...
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            max_token_length=options.max_piece_length,
            show_progress=progress,
        )
        hf.train_from_iterator(_bounded(texts), trainer=trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: Path) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a plain Exception for any parse problem
            raise GptforgeError(f"{path}: not a valid tokenizers JSON file ({err})") from None
        return cls(hf, source=str(path))

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # The "fast" variant (tokenizers >= 0.21) skips computing character offsets, which we
        # never use: about 1.7x faster.
        encode = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
        try:
            return [e.ids for e in encode(list(texts), add_special_tokens=False)]
        except TypeError:  # what the Rust side raises for a lone surrogate
            check_unicode(texts)
            raise

    def _decode(self, ids: list[int]) -> str:
        return self._hf.decode(ids, skip_special_tokens=False)

    def canonical_bytes(self) -> bytes:
        return self._hf.to_str(pretty=False).encode("utf-8")


def _untrained(options: TrainOptions):
    """An empty byte-level BPE with the normaliser and pre-tokenizers the options ask for."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers

    hf = HFTokenizer(models.BPE())
    if options.nfkc:
        hf.normalizer = normalizers.NFKC()
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if options.split_digits:  # each digit alone first, then GPT-2's split of the rest
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        hf.pre_tokenizer = byte_level
    return hf


def _bounded(texts: Iterable[str]) -> Iterator[str]:
    """The texts in pieces the trainer handles in bounded time and memory: long ones cut just
    after a line break (a boundary the byte-level pre-tokenizer makes anyway, bar a space run
    after it, so the learned merges are the same), overlong runs cut into words of
    ``MAX_TRAIN_WORD_CHARS``."""
    for text in texts:
        for part in _without_long_runs(text):
            yield from _at_line_breaks(part)


def _without_long_runs(text: str) -> Iterator[str]:
    start = 0
    for run in _LONG_RUN.finditer(text):
        if run.start() > start:
            yield text[start:run.start()]
        for i in range(run.start(), run.end(), MAX_TRAIN_WORD_CHARS):
            yield text[i:min(i + MAX_TRAIN_WORD_CHARS, run.end())]
        start = run.end()
    if start < len(text) or not text:
        yield text[start:]


def _at_line_breaks(text: str) -> Iterator[str]:
    limit, start = TRAIN_PIECE_CHARS, 0
    while len(text) - start > limit:
        cut = text.rfind("\n", start, start + limit) + 1 or start + limit
        yield text[start:cut]
        start = cut
    yield text[start:]
