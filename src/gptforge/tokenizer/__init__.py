"""Tokenizers: text to token ids and back, behind one interface with three backends.

``char`` (one token per character), ``bpe`` (byte-level BPE) and ``sentencepiece`` (BPE or unigram
with byte fallback) all share :data:`SPECIAL_TOKENS`. Backends import their libraries only when
used, so importing this package stays cheap.
"""

from gptforge.tokenizer.base import (
    EOS_TOKEN,
    KINDS,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)

__all__ = [
    "EOS_TOKEN",
    "KINDS",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "Tokenizer",
    "load_tokenizer",
    "train_tokenizer",
]
