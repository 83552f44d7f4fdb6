"""SentencePiece tokenizer (BPE or unigram model), with byte fallback.

SentencePiece learns pieces directly over Unicode characters and does not need spaces between
words, which makes it the better choice for Chinese, Japanese and mixed-script corpora: common
multi-character words become single tokens. ``byte_fallback`` encodes any character the vocabulary
lacks as its UTF-8 bytes, so nothing is ever ``<unk>``.

SentencePiece normally rewrites text (NFKC, collapsing spaces, a leading "▁"); every such option is
turned off here so that ``decode(encode(s)) == s`` exactly (NFKC can be asked for, trading that
for a vocabulary that does not spend pieces on full-width variants). It still writes a space as
"▁" (U+2581) and decodes every "▁" to a space, so a "▁" in the text itself is encoded as its three
UTF-8 byte tokens, which decode to "▁". The trainer sees the text line by line, so no piece ever
contains a newline: a newline always encodes to its byte token. That also makes cutting a long
document at a line break before encoding give the same ids as encoding it whole.

Saved as ``tokenizer.model``, the standard SentencePiece model file.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from gptforge.errors import GptforgeError
from gptforge.tokenizer.base import (
    SPECIAL_TOKENS,
    NotGptforgeTokenizer,
    Tokenizer,
    TrainOptions,
    check_unicode,
)

DEFAULT_VOCAB_SIZE = 4096
SPACE_MARKER = "\u2581"  # "▁", how SentencePiece writes a space inside its pieces
MODEL_TYPES = ("bpe", "unigram")
DEFAULT_CHARACTER_COVERAGE = 0.9995  # SentencePiece's own default
# Training cuts lines longer than this many characters; 4 bytes per character at most.
MAX_SENTENCE_CHARS = 8192
# Above this many lines SentencePiece samples, which bounds the trainer's memory.
MAX_TRAINING_LINES = 5_000_000


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"
    file_name = "tokenizer.model"

    def __init__(self, model_proto: bytes, source: str = "tokenizer"):
        import sentencepiece

        try:
            sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        except Exception as err:  # the C++ side reports a bad protobuf as a generic error
            raise GptforgeError(f"{source}: not a valid SentencePiece model ({err})") from None
        specials = {t: sp.piece_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in specials.items() if sp.id_to_piece(i) != t]
        if missing:
            raise NotGptforgeTokenizer(f"{source}: lacks the special tokens "
                                       f"{', '.join(missing)}")
        super().__init__(specials)
        self._proto = bytes(model_proto)
        self._sp = sp
        marker = [sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_MARKER.encode()]
        # A model without byte fallback (trained elsewhere) has no way to keep the marker.
        self._marker_ids = marker if all(sp.is_byte(i) for i in marker) else None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int | None = None, *,
              options: TrainOptions = TrainOptions(),
              progress: bool = False) -> SentencePieceTokenizer:
        import sentencepiece

        if options.sp_model_type not in MODEL_TYPES:
            raise GptforgeError(f"unknown SentencePiece model type '{options.sp_model_type}' "
                                f"(choose one of: {', '.join(MODEL_TYPES)})")
        vocab_size = vocab_size or DEFAULT_VOCAB_SIZE
        model = io.BytesIO()
        sentencepiece.set_random_generator_seed(1337)  # sampling of huge corpora is repeatable
        reading_errors: list[BaseException] = []
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=_training_lines(texts, reading_errors), model_writer=model,
                vocab_size=vocab_size, **_TRAINER_OPTIONS, **_chosen_options(options),
                num_threads=max(1, min(os.cpu_count() or 1, 16)),
                minloglevel=1 if progress else 2,  # 1: warnings only
            )
        except RuntimeError as err:
            if reading_errors:  # the C++ side wraps it in a RuntimeError holding a traceback
                raise reading_errors[0] from None
            raise _training_error(err, vocab_size, options) from None
        return cls(model.getvalue())

    @classmethod
    def load(cls, path: Path) -> SentencePieceTokenizer:
        try:
            proto = Path(path).read_bytes()
        except OSError as err:
            raise GptforgeError(f"{path}: cannot read ({err.strerror})") from None
        return cls(proto, source=str(path))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        try:
            if self._marker_ids is None or not any(SPACE_MARKER in t for t in texts):
                return self._sp.encode(texts)
            return [self._encode_with_markers(t) for t in texts]
        except (TypeError, RuntimeError):  # what the C++ side raises for a lone surrogate
            check_unicode(texts)
            raise

    def _encode_with_markers(self, text: str) -> list[int]:
        """The text between "▁" characters encoded as usual, each "▁" as its byte tokens."""
        first, *rest = self._sp.encode(text.split(SPACE_MARKER))
        for part in rest:
            first += self._marker_ids + part
        return first

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def canonical_bytes(self) -> bytes:
        return self._proto


_TRAINER_OPTIONS = dict(
    byte_fallback=True,
    remove_extra_whitespaces=False,  # keep runs of spaces, leading and trailing spaces
    add_dummy_prefix=False,  # no invented leading space, so decode gives the text back
    allow_whitespace_only_pieces=True,  # runs of spaces (indentation) can become one token
    unk_id=len(SPECIAL_TOKENS),  # required by SentencePiece; never produced with byte_fallback
    bos_id=-1, eos_id=-1, pad_id=-1,  # ours are the special tokens above
    hard_vocab_limit=False,  # a small corpus gives a smaller vocabulary instead of an error
    max_sentence_length=4 * MAX_SENTENCE_CHARS,  # in bytes
    input_sentence_size=MAX_TRAINING_LINES,
    shuffle_input_sentence=True,
)


def _chosen_options(options: TrainOptions) -> dict:
    """SentencePiece's names for the options; unset ones keep SentencePiece's defaults."""
    chosen = dict(
        model_type=options.sp_model_type,
        # "identity": keep every character as written, so decode gives the text back.
        normalization_rule_name="nfkc" if options.nfkc else "identity",
        split_digits=options.split_digits,
        # The special tokens get ids 0..5 and decode to their literal text; user symbols follow.
        user_defined_symbols=list(SPECIAL_TOKENS) + list(options.user_symbols),
    )
    if options.character_coverage is not None:
        chosen["character_coverage"] = options.character_coverage
    if options.max_piece_length is not None:
        chosen["max_sentencepiece_length"] = options.max_piece_length
    return chosen


def _training_lines(texts: Iterable[str], errors: list[BaseException]) -> Iterator[str]:
    """Non-empty lines of every document, long ones cut, as SentencePiece's training sentences.

    An exception while reading the texts (a bad input line, Ctrl-C) is also put in ``errors``, so
    that it can be raised as itself once the trainer gives up.
    """
    try:
        for text in texts:
            for line in text.split("\n"):
                for start in range(0, len(line), MAX_SENTENCE_CHARS):
                    yield line[start:start + MAX_SENTENCE_CHARS]
    except GeneratorExit:  # the trainer stopped reading: not an error
        raise
    except BaseException as err:
        errors.append(err)
        raise


def _training_error(err: RuntimeError, vocab_size: int, options: TrainOptions) -> GptforgeError:
    message = str(err)
    too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_small:
        coverage = options.character_coverage or DEFAULT_CHARACTER_COVERAGE
        return GptforgeError(
            f"--vocab-size {vocab_size} is too small for sentencepiece on this text: it needs at "
            f"least {too_small.group(2)} (256 bytes, the special tokens and the characters that "
            f"make up {coverage * 100:g}% of the text); raise --vocab-size, or lower "
            f"--character-coverage (now {coverage}) so that rarer characters become byte tokens")
    return GptforgeError(f"SentencePiece training failed ({message.strip().splitlines()[-1]}); "
                         "check the input, or try another --vocab-size")
