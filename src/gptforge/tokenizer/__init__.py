"""Tokenizers: text to token ids and back, behind one interface with three backends.

``char`` (one token per character), ``bpe`` (byte-level BPE) and ``sentencepiece`` (BPE or unigram
with byte fallback) all share :data:`SPECIAL_TOKENS`. Tokenizers trained elsewhere (Hugging Face,
SentencePiece, tiktoken files) load with their own ids, their tokens mapped onto gptforge's
:data:`ROLES` (:mod:`gptforge.tokenizer.foreign`). Backends import their libraries only when
used, so importing this package stays cheap.
"""

from gptforge.tokenizer.base import (
    EOS_TOKEN,
    KINDS,
    PAD_TOKEN,
    ROLES,
    SPECIAL_TOKENS,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)

__all__ = [
    "EOS_TOKEN",
    "KINDS",
    "PAD_TOKEN",
    "ROLES",
    "SPECIAL_TOKENS",
    "Tokenizer",
    "load_tokenizer",
    "train_tokenizer",
]
