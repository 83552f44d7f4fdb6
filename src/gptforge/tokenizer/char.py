"""Character-level tokenizer: one token per Unicode character seen in the training text.

The smallest useful tokenizer: nothing to train but a set of characters, a tiny vocabulary (about
65 tokens for English plays), and output that is easy to read while debugging a model. Its cost is
long sequences (one token per character) and a closed vocabulary: a character that was not in the
training text cannot be encoded at all, so encoding one raises an error naming it.

Saved as ``chars.json``: the special tokens (ids 0..5) and then the characters in code-point order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from gptforge.errors import GptforgeError
from gptforge.tokenizer.base import SPECIAL_TOKENS, Tokenizer, TrainOptions, split_special

log = logging.getLogger(__name__)

FORMAT = "gptforge-char-tokenizer"
FORMAT_VERSION = 1


class CharTokenizer(Tokenizer):
    kind = "char"
    file_name = "chars.json"

    def __init__(self, chars: Sequence[str]):
        super().__init__({token: i for i, token in enumerate(SPECIAL_TOKENS)})
        self.chars = list(chars)
        self._id_to_text = list(SPECIAL_TOKENS) + self.chars
        self._char_to_id = {c: i for i, c in enumerate(self.chars, start=len(SPECIAL_TOKENS))}

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int | None = None, *,
              options: TrainOptions = TrainOptions(), progress: bool = False) -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            for piece, special in split_special(text):
                if not special:
                    seen.update(piece)
        tokenizer = cls(sorted(seen))
        _check_requested_size(tokenizer.vocab_size, vocab_size)
        return tokenizer

    @classmethod
    def load(cls, path: Path) -> CharTokenizer:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise GptforgeError(f"{path}: cannot read char tokenizer ({err})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise GptforgeError(
                f"{path}: not a gptforge char tokenizer (no \"format\": \"{FORMAT}\")")
        if data.get("version") != FORMAT_VERSION:
            raise GptforgeError(f"{path}: char tokenizer version {data.get('version')!r} is not "
                                f"supported (expected {FORMAT_VERSION})")
        if data.get("special_tokens") != list(SPECIAL_TOKENS):
            raise GptforgeError(f"{path}: special_tokens differ from this gptforge's "
                                f"{list(SPECIAL_TOKENS)}; retrain the tokenizer")
        chars = data.get("chars")
        if (not isinstance(chars, list) or len(set(chars)) != len(chars)
                or not all(isinstance(c, str) and len(c) == 1 for c in chars)):
            raise GptforgeError(f"{path}: \"chars\" must be a list of distinct single characters")
        return cls(chars)

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_text)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece, special in split_special(text):
            if special:
                ids.append(self.special_tokens[piece])
                continue
            try:
                ids.extend([self._char_to_id[c] for c in piece])
            except KeyError as err:
                raise self._unknown_char(err.args[0]) from None
        return ids

    def _unknown_char(self, char: str) -> GptforgeError:
        return GptforgeError(
            f"character {char!r} (U+{ord(char):04X}) is not in the char tokenizer's vocabulary of "
            f"{len(self.chars)} characters; train the tokenizer on text that contains it, or use "
            "--tokenizer bpe or sentencepiece, which can encode any text")

    def _decode(self, ids: list[int]) -> str:
        table = self._id_to_text
        return "".join([table[i] for i in ids])

    def canonical_bytes(self) -> bytes:
        data = {"format": FORMAT, "version": FORMAT_VERSION,
                "special_tokens": list(SPECIAL_TOKENS), "chars": self.chars}
        # ASCII escapes keep the file readable whatever the editor's encoding, and canonical.
        return (json.dumps(data, ensure_ascii=True, indent=1) + "\n").encode("ascii")


def _check_requested_size(natural: int, requested: int | None) -> None:
    """A char vocabulary is fixed by its text; speak up only when another size was asked for."""
    if requested is None or requested == natural:
        return
    if requested < natural:
        raise GptforgeError(
            f"--vocab-size {requested} is too small for a char tokenizer: the text has "
            f"{natural - len(SPECIAL_TOKENS)} distinct characters + {len(SPECIAL_TOKENS)} special "
            f"tokens = {natural}; leave --vocab-size unset for char")
    log.warning("char tokenizer: the text gives %d tokens; --vocab-size %d does not apply to char",
                natural, requested)
