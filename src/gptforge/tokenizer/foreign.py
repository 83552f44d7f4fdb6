"""Tokenizers trained elsewhere, used as they are: a Hugging Face ``tokenizer.json``, a
SentencePiece ``.model``, or a tiktoken ranks file (one ``base64-token rank`` per line).

Weights trained with a tokenizer only mean something with its exact ids, so nothing here
renumbers a token. What gptforge needs from a tokenizer is a token for each of its
:data:`~gptforge.tokenizer.base.ROLES` (end of document, padding, the chat markers); those are
found among the tokenizer's own special tokens (``<|endoftext|>``, ``</s>``, ``<|im_end|>``,
``<|eot_id|>``, its config's ``eos_token``/``pad_token``...) or named by options. Padding falls
back to the end-of-document token (padded positions are never learned from, as in GPT-2). A role
no token fills is an error only when something needs it, and says which option fills it. For a
model trained from scratch, ``add_special_tokens`` appends gptforge's own tokens for the roles left
empty, after the tokenizer's last id, so no existing id moves.

Saved as the tokenizer's own files under fixed names, unchanged, plus the descriptor
``gptforge_tokenizer.json``, the one definition of this format::

    {"format": "gptforge-foreign-tokenizer", "version": 1, "kind": "hf",
     "files": {"tokenizer.json": "<sha256>", "tokenizer_config.json": "<sha256>"},
     "roles": {"eos": "<|endoftext|>", "pad": "<|endoftext|>"},
     "added_tokens": [], "tiktoken_pattern": null}

The descriptor pins each file by its sha256, so its own sha256 is the tokenizer's fingerprint,
and a checkpoint's copy of the directory reloads to the same tokenizer.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gptforge import atomic
from gptforge.errors import GptforgeError
from gptforge.tokenizer.base import (
    DESCRIPTOR_FILE,
    ROLES,
    MissingRoleError,
    Tokenizer,
    TrainOptions,
    check_unicode,
)

log = logging.getLogger(__name__)

FORMAT = "gptforge-foreign-tokenizer"
FORMAT_VERSION = 1
# The fixed name each kind's files are saved under.
MAIN_FILES = {"hf": "tokenizer.json", "spm": "tokenizer.model", "tiktoken": "tokenizer.tiktoken"}
HF_CONFIG_FILE = "tokenizer_config.json"

# A role's usual tokens in other tokenizers, most specific first (GPT-2/Qwen, Llama 3, Llama 2 /
# Mistral, Gemma, DeepSeek; ChatML's and Llama 3's end of turn).
CANDIDATES = {
    "eos": ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|end\u2581of\u2581sentence|>"),
    "pad": ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>"),
    "system": ("<|system|>",),
    "user": ("<|user|>",),
    "assistant": ("<|assistant|>",),
    "end": ("<|end|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>"),
}

# Pre-tokenizer regexes for tiktoken files: GPT-2's (the one gptforge's own bpe uses too),
# cl100k's (GPT-3.5/4: case-insensitive contractions, digits in threes) and Llama 3's (cl100k's,
# written without possessive quantifiers).
TIKTOKEN_PATTERNS = {
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "cl100k": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"""
              r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
    "llama3": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
              r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
}
# The released files' number of ranks and their special tokens, which the files do not hold.
TIKTOKEN_PRESETS = {
    "gpt2": (50256, {"<|endoftext|>": 50256}),
    "cl100k": (100256, {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258,
                        "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
                        "<|endofprompt|>": 100276}),
    # Llama 3's 256 special tokens follow its 128,000 ranks; the reserved ones are numbered as
    # in Llama 3.0 (3.1 renamed a few: same ids).
    "llama3": (128000, {token: 128000 + i for i, token in enumerate(
        ["<|begin_of_text|>", "<|end_of_text|>"]
        + [f"<|reserved_special_token_{i}|>" for i in range(4)]
        + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>",
           "<|eot_id|>"]
        + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)])}),
}
_RANK_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+\r?")


@dataclass
class ForeignOptions:
    """What the user said about a foreign tokenizer (see :func:`~gptforge.tokenizer.base.
    load_tokenizer`); all empty for a saved one, whose roles are fixed."""

    roles: dict[str, str] = field(default_factory=dict)
    add_special_tokens: bool = False
    tiktoken_pattern: str | None = None

    def given(self) -> list[str]:
        named = [ROLES[role][2].split(" ")[0] for role in self.roles]
        return named + ["--add-special-tokens"] * self.add_special_tokens + \
            ["--tiktoken-pattern"] * (self.tiktoken_pattern is not None)

    def refuse_for(self, file: Path, why: str = "it has gptforge's own special tokens") -> None:
        if self.given():
            raise GptforgeError(f"{self.given()[0]} applies to a tokenizer trained elsewhere; "
                                f"{file} needs none ({why})")

    def check(self) -> None:
        unknown = sorted(set(self.roles) - set(ROLES))
        if unknown:
            raise GptforgeError(f"--role-token {unknown[0]}=...: unknown role (roles: "
                                f"{', '.join(ROLES)})")
        if self.tiktoken_pattern not in (None, *TIKTOKEN_PATTERNS):
            raise GptforgeError(f"--tiktoken-pattern {self.tiktoken_pattern}: unknown pattern "
                                f"(choose one of: {', '.join(TIKTOKEN_PATTERNS)})")


# --------------------------------------------------------------------------- backends


class _HFBackend:
    """A ``tokenizers`` tokenizer; it matches its own added tokens in text itself."""

    kind = "hf"

    def __init__(self, files: dict[str, bytes], source: str):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._hf = HFTokenizer.from_str(files[MAIN_FILES["hf"]].decode("utf-8"))
        except Exception as err:  # the Rust side raises a plain Exception for any parse problem
            raise GptforgeError(f"{source}: not a valid tokenizers JSON file "
                                f"({_first_line(err)})") from None
        self.config = _hf_config(files.get(HF_CONFIG_FILE), source)
        added = self._hf.get_added_tokens_decoder().values()
        self.specials = [t.content for t in added if t.special]
        self.unmatched: list[str] = []  # tokens it does not match in text itself: none
        self.size = max(self._hf.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self.named = {name: _content(self.config.get(f"{name}_token"))
                      for name in ("bos", "eos", "pad", "unk")}
        self.chat_template = _default_template(self.config.get("chat_template"))

    def token_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        encode = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._hf.decode(ids, skip_special_tokens=False)


class _SPMBackend:
    """A SentencePiece model as trained: its normaliser, dummy prefix and all. Its control
    tokens (``<s>``, ``</s>``) are not matched in text by SentencePiece, nor decoded to text."""

    kind = "spm"

    def __init__(self, files: dict[str, bytes], source: str):
        import sentencepiece

        try:
            self._sp = sentencepiece.SentencePieceProcessor(
                model_proto=files[MAIN_FILES["spm"]])
        except Exception as err:  # the C++ side reports a bad protobuf as a generic error
            raise GptforgeError(f"{source}: not a valid SentencePiece model "
                                f"({_first_line(err)})") from None
        sp = self._sp
        self.size = sp.get_piece_size()
        self.specials = [sp.id_to_piece(i) for i in range(self.size) if sp.is_control(i)]
        self.unmatched = list(self.specials)
        self.named = {name: sp.id_to_piece(i) if 0 <= i < self.size else None
                      for name, i in (("bos", sp.bos_id()), ("eos", sp.eos_id()),
                                      ("pad", sp.pad_id()), ("unk", sp.unk_id()))}
        self.chat_template = None

    def token_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return i if self._sp.id_to_piece(i) == token else None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)


class _TiktokenBackend:
    """A tiktoken ``Encoding`` built from a ranks file and a pre-tokenizer pattern."""

    kind = "tiktoken"

    def __init__(self, files: dict[str, bytes], source: str, pattern: str | None):
        import tiktoken

        ranks = parse_ranks(files[MAIN_FILES["tiktoken"]], source)
        preset = next((name for name, (n, _) in TIKTOKEN_PRESETS.items() if n == len(ranks)), None)
        self.pattern = pattern or preset or "gpt2"
        specials = dict(TIKTOKEN_PRESETS[preset][1]) if preset else {}
        self._specials = specials
        self._ranks = ranks
        self._enc = tiktoken.Encoding(f"gptforge:{source}", pat_str=TIKTOKEN_PATTERNS[self.pattern],
                                      mergeable_ranks=ranks, special_tokens=specials)
        self.size = self._enc.n_vocab
        self.specials = list(specials)
        self.unmatched: list[str] = []
        self.named = {"bos": None, "eos": None, "pad": None, "unk": None}
        self.chat_template = None

    def token_id(self, token: str) -> int | None:
        return self._specials.get(token, self._ranks.get(token.encode("utf-8")))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        check_unicode(texts)  # tiktoken would quietly encode a lone surrogate as U+FFFD
        return self._enc.encode_batch(texts, allowed_special="all")

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)


def parse_ranks(data: bytes, source: str) -> dict[bytes, int]:
    """``base64-token rank`` lines (tiktoken's format) -> {token bytes: rank}; a bad line is an
    error naming it."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        if not _RANK_LINE.fullmatch(line):
            raise GptforgeError(f"{source}:{number}: not a tiktoken ranks line "
                                f"('<base64 token> <rank>'): {line[:60]!r}")
        token_b64, rank = line.split()
        try:
            token = base64.b64decode(token_b64, validate=True)
        except binascii.Error:
            raise GptforgeError(f"{source}:{number}: invalid base64 {token_b64[:40]!r}") from None
        if token in ranks:
            raise GptforgeError(f"{source}:{number}: token {token!r} is listed twice")
        ranks[token] = int(rank)
    if not ranks:
        raise GptforgeError(f"{source}: holds no tiktoken ranks")
    if len(set(ranks.values())) != len(ranks):
        raise GptforgeError(f"{source}: two tokens share a rank; every rank is one token id")
    return ranks


def is_tiktoken_file(path: Path) -> bool:
    """Whether ``path`` starts like a tiktoken ranks file (a ``.model`` may be either kind)."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    return bool(_RANK_LINE.fullmatch(head.split(b"\n", 1)[0]))


# --------------------------------------------------------------------------- the tokenizer


class ForeignTokenizer(Tokenizer):
    """A tokenizer trained elsewhere, its ids unchanged, with gptforge's roles mapped onto its
    tokens. ``encode`` matches every special token written in the text, as gptforge's own
    tokenizers do; ``decode`` writes them back as text."""

    kind = "foreign"
    file_name = DESCRIPTOR_FILE

    def __init__(self, backend, files: dict[str, bytes], roles: dict[str, str],
                 added_tokens: Sequence[str]):
        self._backend = backend
        self.kind = backend.kind
        self.files = dict(files)
        self.roles = dict(roles)
        self.added_tokens = list(added_tokens)
        self.chat_template = backend.chat_template
        self.named_tokens = dict(backend.named)  # bos/eos/pad/unk as its config names them
        # Tokens matched and decoded here rather than by the backend.
        self._own = {t: backend.token_id(t) for t in backend.unmatched}
        self._own |= {t: backend.size + i for i, t in enumerate(self.added_tokens)}
        self._own_ids = {i: t for t, i in self._own.items()}
        self._own_re = _alternation(self._own)
        self._special_re = _alternation([*backend.specials, *self.added_tokens])
        super().__init__({ROLES[role][0]: self.token_id(token) for role, token in roles.items()})

    def token_id(self, token: str) -> int:
        found = self._own.get(token)
        return found if found is not None else self._backend.token_id(token)

    @classmethod
    def train(cls, texts, vocab_size, *, options: TrainOptions = TrainOptions(),
              progress: bool = False):
        raise GptforgeError("a foreign tokenizer is loaded, not trained; train one of: "
                            "char, bpe, sentencepiece")

    @classmethod
    def load(cls, path: Path) -> ForeignTokenizer:
        return load_saved(path, ForeignOptions())

    @property
    def vocab_size(self) -> int:
        return self._backend.size + len(self.added_tokens)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        if self._own_re is None or not any(self._own_re.search(t) for t in texts):
            return self._encode_plain(texts)
        # Each text as a list of ints (own token ids) and strs (runs for the backend).
        layouts = [[part if i % 2 == 0 else self._own[part]
                    for i, part in enumerate(self._own_re.split(t)) if part] for t in texts]
        runs = [part for layout in layouts for part in layout if isinstance(part, str)]
        encoded = iter(self._encode_plain(runs))
        return [[i for part in layout
                 for i in (next(encoded) if isinstance(part, str) else [part])]
                for layout in layouts]

    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        try:
            return self._backend.encode_batch(texts)
        except (TypeError, RuntimeError, ValueError):  # what the native sides raise for a lone
            check_unicode(texts)  # surrogate
            raise

    def split_special(self, text: str) -> Iterator[tuple[str, bool]]:
        if self._special_re is None:
            yield from ([(text, False)] if text else [])
            return
        for i, piece in enumerate(self._special_re.split(text)):
            if piece:
                yield piece, i % 2 == 1

    def _decode(self, ids: list[int]) -> str:
        if not self._own_ids:
            return self._backend.decode(ids)
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            token = self._own_ids.get(i)
            if token is None:
                run.append(i)
                continue
            if run:
                out.append(self._backend.decode(run))
                run = []
            out.append(token)
        if run:
            out.append(self._backend.decode(run))
        return "".join(out)

    def descriptor(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, "kind": self.kind,
                "files": {name: hashlib.sha256(data).hexdigest()
                          for name, data in sorted(self.files.items())},
                "roles": self.roles, "added_tokens": self.added_tokens,
                "tiktoken_pattern": getattr(self._backend, "pattern", None)}

    def canonical_bytes(self) -> bytes:
        return (json.dumps(self.descriptor(), indent=1, ensure_ascii=True) + "\n").encode()

    def save(self, directory: str | Path) -> list[Path]:
        """The descriptor first (the file to load), then the tokenizer's own files."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, data in sorted(self.files.items()):
            atomic.write_bytes(directory / name, data)
            paths.append(directory / name)
        atomic.write_bytes(directory / DESCRIPTOR_FILE, self.canonical_bytes())
        return [directory / DESCRIPTOR_FILE, *paths]

    def __repr__(self) -> str:
        return f"ForeignTokenizer(kind={self.kind}, vocab_size={self.vocab_size})"


def _alternation(tokens) -> re.Pattern | None:
    """A regex matching any of ``tokens`` (captured, longest first), or None for none."""
    tokens = sorted(set(tokens), key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, tokens)) + ")") if tokens else None


# --------------------------------------------------------------------------- loading


def load_file(file: Path, options: ForeignOptions) -> ForeignTokenizer:
    """A tokenizer file made elsewhere, its roles found among its tokens or given in options."""
    options.check()
    if file.name == HF_CONFIG_FILE:
        raise GptforgeError(f"{file}: this is the tokenizer's config; point to tokenizer.json "
                            "(or the directory holding both)")
    kind = ("tiktoken" if file.suffix == ".tiktoken" or is_tiktoken_file(file)
            else "hf" if file.suffix == ".json" else "spm")
    if kind != "tiktoken" and options.tiktoken_pattern is not None:
        raise GptforgeError(f"--tiktoken-pattern applies to a tiktoken ranks file, not {file}")
    files = {MAIN_FILES[kind]: _read(file)}
    config = file.with_name(HF_CONFIG_FILE)
    if kind == "hf" and config.is_file():
        files[HF_CONFIG_FILE] = _read(config)
    backend = _backend(kind, files, str(file), options.tiktoken_pattern)
    roles, added = _resolve_roles(backend, options, str(file))
    tokenizer = ForeignTokenizer(backend, files, roles, added)
    try:
        _ = tokenizer.eos_id  # every use needs an end of document: a missing one fails now
    except MissingRoleError as err:
        raise MissingRoleError(f"{file}: {err}") from None
    log.info("%s tokenizer %s: vocab %d; roles %s%s", kind, file, tokenizer.vocab_size,
             ", ".join(f"{r}={t}" for r, t in roles.items()),
             f"; added {', '.join(added)}" if added else "")
    return tokenizer


def load_saved(descriptor: Path, options: ForeignOptions) -> ForeignTokenizer:
    """A foreign tokenizer saved by :meth:`ForeignTokenizer.save`, exactly as it was."""
    options.refuse_for(descriptor, "its roles were fixed when it was saved; give the original "
                                   "tokenizer file to choose others")
    try:
        data = json.loads(Path(descriptor).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GptforgeError(f"{descriptor}: cannot read ({err})") from None
    problem = _descriptor_problem(data)
    if problem:
        raise GptforgeError(f"{descriptor}: {problem}")
    files = {}
    for name, sha256 in data["files"].items():
        content = _read(descriptor.with_name(name))
        if hashlib.sha256(content).hexdigest() != sha256:
            raise GptforgeError(f"{descriptor.with_name(name)}: damaged or replaced (its sha256 "
                                f"differs from the one in {descriptor.name}); copy it again")
        files[name] = content
    backend = _backend(data["kind"], files, str(descriptor), data.get("tiktoken_pattern"))
    tokenizer = ForeignTokenizer(backend, files, data["roles"], data["added_tokens"])
    missing = [t for r, t in tokenizer.roles.items() if tokenizer.token_id(t) is None]
    if missing:
        raise GptforgeError(f"{descriptor}: names {missing[0]!r}, which the tokenizer lacks")
    return tokenizer


def _descriptor_problem(data) -> str | None:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return f"not a gptforge foreign tokenizer descriptor (no \"format\": \"{FORMAT}\")"
    if data.get("version") != FORMAT_VERSION:
        return f"version {data.get('version')!r} is not supported (expected {FORMAT_VERSION})"
    if data.get("kind") not in MAIN_FILES:
        return f"unknown kind {data.get('kind')!r} (expected one of: {', '.join(MAIN_FILES)})"
    if not isinstance(data.get("files"), dict) or MAIN_FILES[data["kind"]] not in data["files"]:
        return f"'files' must list {MAIN_FILES[data['kind']]} with its sha256"
    if set(data["files"]) - {MAIN_FILES[data["kind"]], HF_CONFIG_FILE}:
        return "'files' lists an unexpected file"
    if not isinstance(data.get("roles"), dict) or set(data["roles"]) - set(ROLES):
        return f"'roles' must map roles ({', '.join(ROLES)}) to tokens"
    if not isinstance(data.get("added_tokens"), list):
        return "'added_tokens' must be a list"
    return None


def _backend(kind: str, files: dict[str, bytes], source: str, pattern: str | None):
    if kind == "hf":
        return _HFBackend(files, source)
    if kind == "spm":
        return _SPMBackend(files, source)
    return _TiktokenBackend(files, source, pattern)


def _resolve_roles(backend, options: ForeignOptions,
                   source: str) -> tuple[dict[str, str], list[str]]:
    """Role -> token: the options', else the first of the role's usual tokens the tokenizer has;
    padding falls back to the end of document; with ``add_special_tokens``, gptforge's tokens
    for the roles still empty, to be appended."""
    roles: dict[str, str] = {}
    for role, (_, _, option) in ROLES.items():
        given = options.roles.get(role)
        if given is not None:
            if backend.token_id(given) is None:
                raise GptforgeError(f"{option.split(' ')[0]} {given!r}: {source} has no such "
                                    "token")
            roles[role] = given
            continue
        found = next((t for t in _candidates(backend, role) if backend.token_id(t) is not None),
                     None)
        if found is not None:
            roles[role] = found
    added = []
    if options.add_special_tokens:
        added = [ROLES[role][0] for role in ROLES if role not in roles]
        roles |= {role: ROLES[role][0] for role in ROLES if role not in roles}
    if "pad" not in roles and "eos" in roles:
        roles["pad"] = roles["eos"]
    return {role: roles[role] for role in ROLES if role in roles}, added


def _candidates(backend, role: str) -> list[str]:
    named = backend.named
    if role == "eos":  # a chat model's config may call its end of turn eos_token: last resort
        return [*CANDIDATES["eos"], *([named["eos"]] if named["eos"] else [])]
    if role == "pad":
        return [*([named["pad"]] if named["pad"] else []), *CANDIDATES["pad"]]
    return list(CANDIDATES[role])


def _hf_config(data: bytes | None, source: str) -> dict:
    if data is None:
        return {}
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GptforgeError(f"{source}: its {HF_CONFIG_FILE} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise GptforgeError(f"{source}: its {HF_CONFIG_FILE} is not a JSON object")
    return config


def _default_template(value) -> str | None:
    """tokenizer_config.json's ``chat_template``: one Jinja string, or a list of named ones of
    which "default" is the one used for plain chat."""
    if isinstance(value, list):
        value = next((t.get("template") for t in value
                      if isinstance(t, dict) and t.get("name") == "default"), None)
    return value if isinstance(value, str) else None


def _content(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise GptforgeError(f"{path}: cannot read ({err.strerror})") from None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[-1] if lines else type(err).__name__
