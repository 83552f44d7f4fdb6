"""The tokenizer interface shared by every backend, and how tokenizers are trained and found.

A model only ever sees integer ids, so everything downstream (shards, training, generation) talks
to tokenizers through the small :class:`Tokenizer` interface defined here. Three backends implement
it (characters, byte-level BPE, SentencePiece); all of them reserve the same :data:`SPECIAL_TOKENS`
so that end-of-document marks and, later, chat turns mean the same thing whichever one is used.

A tokenizer gptforge trained is saved as one file whose *name* says which backend wrote it, which
lets :func:`load_tokenizer` open a directory without any extra metadata. A tokenizer trained
elsewhere (a Hugging Face ``tokenizer.json``, a SentencePiece ``.model``, a tiktoken ranks file)
keeps its own ids; which of its tokens plays each of gptforge's :data:`ROLES` is worked out from
its special tokens or given by options, and saved beside it in a small descriptor
(:mod:`gptforge.tokenizer.foreign`).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
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

# The parts gptforge gives special tokens: role -> (gptforge's token, what it is, how to name
# another tokenizer's token for it).
ROLES = {
    "eos": (EOS_TOKEN, "end of document", "--eos-token TOKEN"),
    "pad": (PAD_TOKEN, "padding", "--pad-token TOKEN"),
    "system": ("<|system|>", "system turn marker", "--role-token system=TOKEN"),
    "user": ("<|user|>", "user turn marker", "--role-token user=TOKEN"),
    "assistant": ("<|assistant|>", "assistant turn marker", "--role-token assistant=TOKEN"),
    "end": ("<|end|>", "end of turn", "--role-token end=TOKEN"),
}
ROLE_OF_TOKEN = {token: role for role, (token, _, _) in ROLES.items()}

# The file a saved tokenizer of each kind lives in: the name alone identifies the backend.
KIND_FILES = {"char": "chars.json", "bpe": "tokenizer.json", "sentencepiece": "tokenizer.model"}
TOKENIZER_FILES = {file: kind for kind, file in KIND_FILES.items()}
# Beside a foreign tokenizer's own files: which roles its tokens play (see tokenizer/foreign.py).
DESCRIPTOR_FILE = "gptforge_tokenizer.json"
# File names a foreign tokenizer may have; a ``.model`` holding base64 lines is a tiktoken file
# (Llama 3 ships one under that name).
FOREIGN_SUFFIXES = (".json", ".model", ".tiktoken")
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


class MissingRoleError(GptforgeError):
    """A role (end of document, padding, a chat marker) that the tokenizer has no token for."""


class NotGptforgeTokenizer(GptforgeError):
    """A valid tokenizer file without gptforge's special tokens: it is loaded as a foreign one."""


class SpecialTokens(dict):
    """gptforge's special token -> id; looking up a role the tokenizer lacks is a one-line error
    that names the option which fills it (``.get`` still returns None)."""

    def __missing__(self, token: str) -> int:
        role = ROLE_OF_TOKEN.get(token)
        if role is None:
            raise KeyError(token)
        _, what, option = ROLES[role]
        raise MissingRoleError(
            f"the tokenizer has no token for the {what} role ({role}); name one of its tokens "
            f"with {option} (or, when training from scratch, --add-special-tokens)")


@dataclass(frozen=True)
class TrainOptions:
    """How a tokenizer is trained; each field applies to the kinds listed, and setting it for
    another kind is refused (see :func:`train_tokenizer`)."""

    sp_model_type: str = "bpe"
    """sentencepiece: ``bpe`` or ``unigram``."""
    character_coverage: float | None = None
    """sentencepiece: share of character occurrences the vocabulary must hold as characters;
    the rarest rest is written as UTF-8 byte tokens. None: SentencePiece's default, 0.9995."""
    split_digits: bool = False
    """bpe, sentencepiece: every digit its own token, so numbers are read digit by digit."""
    user_symbols: tuple[str, ...] = ()
    """bpe, sentencepiece: strings that are always one token (never split or merged)."""
    max_piece_length: int | None = None
    """bpe, sentencepiece: the longest token, in characters (bpe: byte-level characters).
    None: the library's default (16 for sentencepiece, unlimited for bpe)."""
    nfkc: bool = False
    """bpe, sentencepiece: NFKC-normalise text before tokenizing (full-width letters and digits
    become ASCII, ligatures split); decode then gives the normalised text, not the original."""

    def check(self, kind: str) -> None:
        """Refuse, in one line, an option that the ``kind`` backend would ignore."""
        given = {f.name for f in fields(self) if getattr(self, f.name) != f.default}
        allowed = _KIND_OPTIONS[kind]
        wrong = sorted(given - allowed)
        if wrong:
            kinds = ", ".join(k for k, names in _KIND_OPTIONS.items() if wrong[0] in names)
            raise GptforgeError(f"--{wrong[0].replace('_', '-')} does not apply to a {kind} "
                                f"tokenizer (it applies to: {kinds})")
        if self.character_coverage is not None and not 0.5 <= self.character_coverage <= 1:
            raise GptforgeError(f"--character-coverage must be between 0.5 and 1, got "
                                f"{self.character_coverage}")
        if self.max_piece_length is not None and self.max_piece_length < 1:
            raise GptforgeError(f"--max-piece-length must be positive, got "
                                f"{self.max_piece_length}")
        if any(not symbol for symbol in self.user_symbols):
            raise GptforgeError("--user-symbols: an empty string cannot be a token")


_COMMON_OPTIONS = {"split_digits", "user_symbols", "max_piece_length", "nfkc"}
_KIND_OPTIONS = {"char": set(), "bpe": _COMMON_OPTIONS,
                 "sentencepiece": _COMMON_OPTIONS | {"sp_model_type", "character_coverage"}}


def check_tokenizer_options(training: bool, options: Mapping) -> None:
    """Refuse loading options when a tokenizer is trained, and training options when one is
    loaded (the caller passes them on to :func:`train_tokenizer` or :func:`load_tokenizer`)."""
    from gptforge.tokenizer.foreign import ForeignOptions

    accepted = TrainOptions if training else ForeignOptions
    wrong = sorted(set(options) - {f.name for f in fields(accepted)})
    if not wrong:
        return
    name = {"roles": "--eos-token/--pad-token/--role-token"}.get(wrong[0],
                                                              "--" + wrong[0].replace("_", "-"))
    if training:
        raise GptforgeError(f"{name} applies to a tokenizer trained elsewhere (--tokenizer "
                            "PATH), not to one trained now")
    raise GptforgeError(f"{name} applies when training a tokenizer (--tokenizer bpe or "
                        "sentencepiece), not to a saved one")


class Tokenizer(ABC):
    """Text <-> token ids, with the special tokens at fixed, known ids.

    ``encode`` never adds tokens of its own; callers append ``eos_id`` where a document ends. A
    special token written literally in the text (``"<|endoftext|>"``) is encoded to its id, so
    that corpora which already use it as a separator, and chat templates, come out as intended.
    ``decode`` writes special tokens back as their literal strings: ``decode(encode(s)) == s``.
    """

    kind: ClassVar[str]
    file_name: ClassVar[str]
    # A Hugging Face tokenizer's Jinja chat template, kept as data; gptforge's own have none.
    chat_template: str | None = None

    def __init__(self, special_tokens: Mapping[str, int]):
        self.special_tokens = SpecialTokens(special_tokens)

    @classmethod
    @abstractmethod
    def train(cls, texts: Iterable[str], vocab_size: int | None, *,
              options: TrainOptions = TrainOptions(), progress: bool = False) -> Tokenizer:
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

    def split_special(self, text: str) -> Iterator[tuple[str, bool]]:
        """``(piece, is_special)`` runs of ``text``, each of this tokenizer's special tokens a
        piece of its own (foreign tokenizers have other special tokens than gptforge's)."""
        return split_special(text)

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
                    sp_model_type: str = "bpe", progress: bool = False,
                    **options) -> Tokenizer:
    """Train a ``kind`` tokenizer on ``texts`` (an iterable of documents, consumed once).

    ``vocab_size`` None (or 0) picks the backend's default: the natural size for ``char``, 4096 for
    ``bpe`` and ``sentencepiece``. ``options`` are the fields of :class:`TrainOptions`
    (``character_coverage=0.9995``, ``split_digits=True``, ...); one that ``kind`` would ignore
    is refused.
    """
    if kind not in _BACKENDS:
        raise GptforgeError(f"unknown tokenizer kind '{kind}' (choose one of: {', '.join(KINDS)})")
    if vocab_size is not None and vocab_size < 0:
        raise GptforgeError(f"--vocab-size must be positive, got {vocab_size}")
    unknown = sorted(set(options) - {f.name for f in fields(TrainOptions)})
    if unknown:
        raise TypeError(f"train_tokenizer() got unknown options: {', '.join(unknown)}")
    train_options = TrainOptions(sp_model_type=sp_model_type, **{
        k: tuple(v) if k == "user_symbols" else v for k, v in options.items()})
    train_options.check(kind)
    counter = _CharCounter(texts)
    try:
        tokenizer = _backend(kind).train(
            counter, vocab_size or None, options=train_options, progress=progress)
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
    """The tokenizer file at ``path``: the file itself, or the one tokenizer in a directory (a
    foreign tokenizer's descriptor, else the single known file; a Hugging Face directory's
    ``tokenizer.json`` wins over the ``tokenizer.model`` it often ships too)."""
    path = Path(path)
    known = ", ".join([*TOKENIZER_FILES, "*.tiktoken"])
    if path.is_dir():
        if (path / DESCRIPTOR_FILE).is_file():
            return path / DESCRIPTOR_FILE
        found = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
        found += sorted(path.glob("*.tiktoken"))
        if (path / "tokenizer_config.json").is_file() and (path / "tokenizer.json") in found:
            found = [path / "tokenizer.json"]
        if not found:
            raise GptforgeError(f"{path}: no tokenizer file in this directory (expected one of: "
                                f"{known}); train one with `gptforge tokenizer train`")
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise GptforgeError(f"{path}: holds several tokenizer files ({names}); "
                                "point to the one you want")
        return found[0]
    if path.is_file():
        if path.name not in TOKENIZER_FILES and path.suffix not in FOREIGN_SUFFIXES:
            raise GptforgeError(f"{path}: unknown tokenizer file name (expected one of: {known}, "
                                "or a .json / .model / .tiktoken file)")
        return path
    raise GptforgeError(f"no such tokenizer file or directory: {path}")


def load_tokenizer(path: str | Path, *, roles: Mapping[str, str] | None = None,
                   add_special_tokens: bool = False,
                   tiktoken_pattern: str | None = None) -> Tokenizer:
    """Load a tokenizer from its file, or from a directory holding exactly one.

    A file gptforge wrote loads as its backend. Any other tokenizer file (a Hugging Face
    ``tokenizer.json``, a SentencePiece ``.model``, a tiktoken ranks file) or a saved descriptor
    loads as a :class:`~gptforge.tokenizer.foreign.ForeignTokenizer` with its ids unchanged:
    ``roles`` (role -> one of its tokens, see :data:`ROLES`) overrides what is found among its
    special tokens, ``add_special_tokens`` appends gptforge's tokens for the roles left unfilled
    (only for a model trained from scratch: the ids after the tokenizer's own are new), and
    ``tiktoken_pattern`` names a tiktoken file's pre-tokenizer regex.
    """
    from gptforge.tokenizer import foreign

    file = find_tokenizer_file(path)
    options = foreign.ForeignOptions(dict(roles or {}), add_special_tokens, tiktoken_pattern)
    if file.name == DESCRIPTOR_FILE:
        return foreign.load_saved(file, options)
    if file.name in TOKENIZER_FILES and not foreign.is_tiktoken_file(file):
        try:
            tokenizer = _backend(TOKENIZER_FILES[file.name]).load(file)
        except NotGptforgeTokenizer:
            return foreign.load_file(file, options)
        options.refuse_for(file)
        return tokenizer
    return foreign.load_file(file, options)
