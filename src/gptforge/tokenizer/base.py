"""The tokenizer interface shared by every backend, and how tokenizers are trained and found.

A model only ever sees integer ids, so everything downstream (shards, training, generation) talks
to tokenizers through the small :class:`Tokenizer` interface defined here. Three backends implement
it (characters, byte-level BPE, SentencePiece); all of them reserve the same :data:`SPECIAL_TOKENS`
so that end-of-document marks and, later, chat turns mean the same thing whichever one is used.

A tokenizer is saved as one file whose *name* says which backend wrote it, which lets
:func:`load_tokenizer` open a directory without any extra metadata.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import ClassVar

from gptforge import atomic
from gptforge.errors import GptforgeError

log = logging.getLogger(__name__)

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|pad|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
)
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

KINDS = ("char", "bpe", "sentencepiece")

# The file a saved tokenizer of each kind lives in: the name alone identifies the backend.
KIND_FILES = {"char": "chars.json", "bpe": "tokenizer.json", "sentencepiece": "tokenizer.model"}
TOKENIZER_FILES = {file: kind for kind, file in KIND_FILES.items()}
# (module, class) as strings, so that using one backend imports only that backend's library.
_BACKENDS = {
    "char": ("gptforge.tokenizer.char", "CharTokenizer"),
    "bpe": ("gptforge.tokenizer.bpe", "BPETokenizer"),
    "sentencepiece": ("gptforge.tokenizer.spm", "SentencePieceTokenizer"),
}

# Special tokens are matched as whole strings; longest first so no token shadows a longer one.
_SPECIAL_RE = re.compile(
    "(" + "|".join(re.escape(t) for t in sorted(SPECIAL_TOKENS, key=len, reverse=True)) + ")"
)


class Tokenizer(ABC):
    """Text <-> token ids, with the special tokens at fixed, known ids.

    ``encode`` never adds tokens of its own; callers append ``eos_id`` where a document ends. A
    special token written literally in the text (``"<|endoftext|>"``) is encoded to its id, so
    that corpora which already use it as a separator, and chat templates, come out as intended.
    ``decode`` writes special tokens back as their literal strings: ``decode(encode(s)) == s``.
    """

    kind: ClassVar[str]
    file_name: ClassVar[str]

    def __init__(self, special_tokens: dict[str, int]):
        self.special_tokens = dict(special_tokens)

    @classmethod
    @abstractmethod
    def train(cls, texts: Iterable[str], vocab_size: int | None, *, sp_model_type: str = "bpe",
              progress: bool = False) -> Tokenizer:
        """Learn a vocabulary from an iterable of documents; ``vocab_size`` None = the default."""

    @classmethod
    @abstractmethod
    def load(cls, path: Path) -> Tokenizer:
        """Read a file written by :meth:`save`; malformed content raises GptforgeError."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included; every id is in ``range(vocab_size)``."""

    @property
    def eos_id(self) -> int:
        return self.special_tokens[EOS_TOKEN]

    @property
    def pad_id(self) -> int:
        return self.special_tokens[PAD_TOKEN]

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; adds no special tokens."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``; backends with a native batch path override it."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise GptforgeError(
                f"token id {bad} is outside this {self.kind} tokenizer's vocabulary "
                f"(0..{self.vocab_size - 1}); the ids come from a different tokenizer or model")
        return self._decode(ids)

    @abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """Decode ids already known to be in range."""

    @abstractmethod
    def canonical_bytes(self) -> bytes:
        """The exact content :meth:`save` writes; equal tokenizers give equal bytes."""

    def save(self, directory: str | Path) -> list[Path]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / self.file_name
        atomic.write_bytes(path, self.canonical_bytes())
        return [path]

    def fingerprint(self) -> str:
        """sha256 of the saved file's content, so ``sha256sum`` of the file gives the same value."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


def split_special(text: str) -> Iterator[tuple[str, bool]]:
    """Yield ``(piece, is_special)`` runs of ``text``; each special token is a piece of its own."""
    for i, piece in enumerate(_SPECIAL_RE.split(text)):
        if piece:
            yield piece, i % 2 == 1  # re.split puts captured separators at odd positions


def surrogate_problem(text: str) -> str | None:
    """What is wrong with ``text`` if it holds a lone surrogate (which no backend can encode: a
    ``\\ud800`` JSON escape, or bytes that were not UTF-8 on the command line); else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return (f"the text holds an unpaired surrogate {text[err.start]!r} at character "
                f"{err.start}, which is not valid Unicode")
    return None


def check_unicode(texts: Iterable[str]) -> None:
    """Raise a GptforgeError naming the first lone surrogate in ``texts``."""
    for text in texts:
        problem = surrogate_problem(text)
        if problem:
            raise GptforgeError(f"{problem} and cannot be encoded; fix the input text")


def _backend(kind: str) -> type[Tokenizer]:
    module, name = _BACKENDS[kind]
    return getattr(importlib.import_module(module), name)


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int | None = None, *,
                    sp_model_type: str = "bpe", progress: bool = False) -> Tokenizer:
    """Train a ``kind`` tokenizer on ``texts`` (an iterable of documents, consumed once).

    ``vocab_size`` None (or 0) picks the backend's default: the natural size for ``char``, 4096 for
    ``bpe`` and ``sentencepiece``.
    """
    if kind not in _BACKENDS:
        raise GptforgeError(f"unknown tokenizer kind '{kind}' (choose one of: {', '.join(KINDS)})")
    if vocab_size is not None and vocab_size < 0:
        raise GptforgeError(f"--vocab-size must be positive, got {vocab_size}")
    counter = _CharCounter(texts)
    try:
        tokenizer = _backend(kind).train(
            counter, vocab_size or None, sp_model_type=sp_model_type, progress=progress)
    except Exception:
        if counter.exhausted and counter.chars == 0:  # the backend choked on empty input
            raise GptforgeError("no text to train the tokenizer on: the input is empty") from None
        raise
    if counter.chars == 0:
        raise GptforgeError("no text to train the tokenizer on: the input is empty")
    log.debug("trained %s tokenizer: %d tokens from %d characters", kind,
              tokenizer.vocab_size, counter.chars)
    return tokenizer


class _CharCounter:
    """Pass texts through while counting characters, to detect an empty training corpus."""

    def __init__(self, texts: Iterable[str]):
        self._texts = texts
        self.chars = 0
        self.exhausted = False

    def __iter__(self) -> Iterator[str]:
        for text in self._texts:
            self.chars += len(text)
            yield text
        self.exhausted = True


def find_tokenizer_file(path: str | Path) -> Path:
    """The tokenizer file at ``path``: the file itself, or the single known file in a directory."""
    path = Path(path)
    known = ", ".join(TOKENIZER_FILES)
    if path.is_dir():
        found = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
        if not found:
            raise GptforgeError(f"{path}: no tokenizer file in this directory (expected one of: "
                                f"{known}); train one with `gptforge tokenizer train`")
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise GptforgeError(f"{path}: holds several tokenizer files ({names}); "
                                "point to the one you want")
        return found[0]
    if path.is_file():
        if path.name not in TOKENIZER_FILES:
            raise GptforgeError(f"{path}: unknown tokenizer file name (expected one of: {known})")
        return path
    raise GptforgeError(f"no such tokenizer file or directory: {path}")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a saved tokenizer from its file, or from a directory holding exactly one such file."""
    file = find_tokenizer_file(path)
    return _backend(TOKENIZER_FILES[file.name]).load(file)
