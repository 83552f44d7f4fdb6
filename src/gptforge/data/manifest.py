"""The manifest of a prepared data directory, read into a typed record.

``gptforge prepare`` writes ``DIR/manifest.json``: the tokenizer (kind, file, fingerprint,
vocabulary size, special ids), the token dtype of the shards, the tokens of each split, the
sources and settings, and timing figures (docs/data.md lists every field). Everything that reads a
prepared directory (training, evaluation, resuming a prepare) reads it here, checked once for the
fields readers rely on, and gets named attributes instead of chains of ``.get``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gptforge.errors import GptforgeError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1

REQUIRED_KEYS = {"format_version": int, "tokenizer": dict, "token_dtype": str, "splits": dict}
REQUIRED_TOKENIZER_KEYS = ("kind", "file", "sha256", "vocab_size", "eos_id")


def read_manifest(data_dir: Path) -> dict:
    """The manifest of a prepared data directory, checked for the fields readers rely on."""
    path = Path(data_dir) / MANIFEST_NAME
    rerun = f"run `gptforge prepare --out {data_dir} ...` to (re)build it"
    if not path.is_file():
        raise GptforgeError(f"{path}: no such file; {data_dir} is not a prepared data directory; "
                            f"{rerun}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GptforgeError(f"{path}: corrupt manifest ({err}); {rerun}") from None
    problem = _manifest_problem(data)
    if problem:
        raise GptforgeError(f"{path}: {problem}; {rerun}")
    return data


def _manifest_problem(data: object) -> str | None:
    if not isinstance(data, dict):
        return "not a JSON object"
    for key, kind in REQUIRED_KEYS.items():
        if not isinstance(data.get(key), kind):
            return f"missing or malformed '{key}'"
    if data["format_version"] != MANIFEST_VERSION:
        return (f"manifest format version {data['format_version']} is not supported (expected "
                f"{MANIFEST_VERSION})")
    missing = [k for k in REQUIRED_TOKENIZER_KEYS if k not in data["tokenizer"]]
    if missing:
        return f"'tokenizer' lacks {', '.join(missing)}"
    if "train" not in data["splits"]:
        return "'splits' has no 'train'"
    return None


@dataclass(frozen=True)
class TokenizerEntry:
    """The manifest's ``tokenizer`` entry."""

    kind: str
    file: str
    """Path of the tokenizer file, relative to the data directory."""
    sha256: str
    """The tokenizer's fingerprint; checkpoints record it, resuming and evaluation compare it."""
    vocab_size: int
    eos_id: int
    info: dict
    """The whole entry as written, which checkpoints copy into their ``model.json``."""


@dataclass(frozen=True)
class Manifest:
    """A prepared data directory, as its manifest describes it."""

    dir: Path
    tokenizer: TokenizerEntry
    token_dtype: str
    split_tokens: dict[str, int]
    """Tokens in each split (``train``, and ``val`` when one was held out)."""
    raw: dict
    """The manifest as written, for the fields without an attribute (sources, settings, ...)."""

    @classmethod
    def read(cls, data_dir: str | Path) -> Manifest:
        data_dir = Path(data_dir)
        raw = read_manifest(data_dir)
        tok = raw["tokenizer"]
        entry = TokenizerEntry(kind=tok["kind"], file=tok["file"], sha256=tok["sha256"],
                               vocab_size=int(tok["vocab_size"]), eos_id=int(tok["eos_id"]),
                               info=tok)
        splits = {name: int(split.get("tokens", 0)) for name, split in raw["splits"].items()
                  if isinstance(split, dict)}
        return cls(data_dir, entry, raw["token_dtype"], splits, raw)

    @property
    def tokenizer_dir(self) -> Path:
        return self.dir / "tokenizer"

    def tokens(self, split: str) -> int:
        """Tokens in ``split`` (0 if there is no such split)."""
        return self.split_tokens.get(split, 0)
