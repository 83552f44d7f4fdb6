"""The three tokenizer backends behind one interface: round trips, special tokens, save/load."""

from __future__ import annotations

import hashlib

import pytest

from gptforge.errors import GptforgeError
from gptforge.tokenizer import (
    EOS_TOKEN,
    SPECIAL_TOKENS,
    load_tokenizer,
    train_tokenizer,
)

ENGLISH = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "    Or to take arms against a sea of troubles\n\n"
)
CHINESE = "春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。\n床前明月光，疑是地上霜。\n"
CORPUS = [ENGLISH * 8, CHINESE * 8, "def f(x):\n\treturn x  *  2\n" * 8]

# Exotic on purpose: runs of spaces, tabs, blank lines, CRLF, leading/trailing space, emoji.
ROUND_TRIP = [
    "  hello   world  \n\n\n\tindented\ttab\n",
    "trailing spaces   \r\nwindows line\r\n",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "mixed 中文 and English 😀🎉 ü ñ ∑\n",
    " ",
    "\n",
    "",
    "literal <|endoftext|> and <|user|> tokens",
    "\u2581 is SentencePiece's space marker:\u2581\u2581 a \u2581b \u2581",
]

KINDS_AND_OPTIONS = [
    ("char", None, {}),
    ("bpe", 400, {}),
    ("sentencepiece", 400, {"sp_model_type": "bpe"}),
    ("sentencepiece", 400, {"sp_model_type": "unigram"}),
]
IDS = ["char", "bpe", "spm-bpe", "spm-unigram"]


@pytest.fixture(scope="module", params=KINDS_AND_OPTIONS, ids=IDS)
def trained(request):
    kind, vocab_size, options = request.param
    texts = CORPUS + ["".join(sorted(set("".join(ROUND_TRIP))))] if kind == "char" else CORPUS
    return train_tokenizer(kind, iter(texts), vocab_size, **options)


def test_round_trip_is_exact(trained):
    for text in ROUND_TRIP + CORPUS:
        ids = trained.encode(text)
        assert all(0 <= i < trained.vocab_size for i in ids)
        assert trained.decode(ids) == text, (trained.kind, text)


def test_lone_surrogates_are_a_clear_error(trained):
    # What a \\ud800 JSON escape or undecodable command-line bytes turn into.
    for bad in (["a\ud800b"], ["fine", "x\udcff"]):
        with pytest.raises(GptforgeError, match=r"\\ud800|\\udcff"):
            trained.encode_batch(bad)
        with pytest.raises(GptforgeError, match=r"\\ud800|\\udcff"):
            trained.encode(bad[-1])


def test_encode_batch_equals_encode(trained):
    assert trained.encode_batch(ROUND_TRIP) == [trained.encode(t) for t in ROUND_TRIP]


def test_special_tokens(trained):
    specials = trained.special_tokens
    assert tuple(specials) == SPECIAL_TOKENS
    assert len(set(specials.values())) == len(SPECIAL_TOKENS)
    assert trained.eos_id == specials[EOS_TOKEN] and trained.pad_id == specials["<|pad|>"]
    for token, token_id in specials.items():
        assert trained.decode([token_id]) == token  # literal text, not dropped
        assert trained.encode(token) == [token_id]  # written literally, it is the special token
    assert trained.encode("ab") + [trained.eos_id] == trained.encode("ab" + EOS_TOKEN)


def test_save_load_keeps_everything(trained, tmp_path):
    paths = trained.save(tmp_path / "tok")
    assert [p.name for p in paths] == [trained.file_name]
    for where in (tmp_path / "tok", paths[0]):  # the directory or the file itself
        loaded = load_tokenizer(where)
        assert type(loaded) is type(trained) and loaded.kind == trained.kind
        assert loaded.vocab_size == trained.vocab_size
        assert loaded.special_tokens == trained.special_tokens
        assert loaded.fingerprint() == trained.fingerprint()
        assert [loaded.encode(t) for t in ROUND_TRIP] == [trained.encode(t) for t in ROUND_TRIP]
    # The fingerprint is the sha256 of the saved file, so it can be checked with sha256sum.
    assert hashlib.sha256(paths[0].read_bytes()).hexdigest() == trained.fingerprint()


def test_decode_rejects_out_of_range_ids(trained):
    with pytest.raises(GptforgeError, match=f"token id {trained.vocab_size} is outside"):
        trained.decode([0, trained.vocab_size])


def test_fingerprints_differ_between_tokenizers():
    a = train_tokenizer("bpe", [ENGLISH * 4], 300)
    b = train_tokenizer("bpe", [CHINESE * 4], 300)
    c = train_tokenizer("char", [ENGLISH])
    assert len({a.fingerprint(), b.fingerprint(), c.fingerprint()}) == 3
    assert train_tokenizer("bpe", [ENGLISH * 4], 300).fingerprint() == a.fingerprint()


def test_char_vocabulary_is_sorted_and_deterministic():
    tok = train_tokenizer("char", iter(["cab\n", "bca"]))
    assert tok.vocab_size == len(SPECIAL_TOKENS) + 4
    assert tok.chars == ["\n", "a", "b", "c"]
    assert tok.encode("abc") == [7, 8, 9]
    # Literal special tokens in the training text do not add their characters.
    assert train_tokenizer("char", ["x<|endoftext|>"]).chars == ["x"]


def test_char_unknown_character_is_named():
    tok = train_tokenizer("char", ["abc"])
    with pytest.raises(GptforgeError, match=r"character 'é' \(U\+00E9\) is not in"):
        tok.encode("abé")


def test_char_vocab_size_too_small():
    with pytest.raises(GptforgeError, match="--vocab-size 5 is too small for a char tokenizer"):
        train_tokenizer("char", ["abcdef"], 5)


def test_bpe_vocab_size_too_small():
    with pytest.raises(GptforgeError, match="needs at least 262"):
        train_tokenizer("bpe", [ENGLISH], 100)


def test_sentencepiece_vocab_size_too_small_is_a_clear_error():
    with pytest.raises(GptforgeError, match=r"--vocab-size 100 is too small for sentencepiece.*"
                                            r"at least \d+"):
        train_tokenizer("sentencepiece", [ENGLISH], 100)


def test_sentencepiece_small_corpus_gives_smaller_vocab_instead_of_failing():
    tok = train_tokenizer("sentencepiece", [ENGLISH], None)  # default 4096 on ~200 bytes
    assert 256 < tok.vocab_size < 4096


def test_sentencepiece_compresses_chinese():
    tok = train_tokenizer("sentencepiece", [CHINESE * 20], 400)
    assert len(tok.encode(CHINESE)) < len(CHINESE)  # multi-character pieces were learned


@pytest.mark.parametrize("kind", ["char", "bpe", "sentencepiece"])
def test_empty_training_text_is_an_error(kind):
    with pytest.raises(GptforgeError, match="no text to train the tokenizer on"):
        train_tokenizer(kind, iter([]), 300 if kind != "char" else None)


@pytest.mark.parametrize("kind", ["char", "bpe", "sentencepiece"])
@pytest.mark.parametrize("error", [GptforgeError("data.jsonl:7: invalid JSON"),
                                   KeyboardInterrupt()])
def test_an_error_while_reading_the_texts_comes_out_as_it_is(kind, error):
    # Texts are read while the tokenizer trains: a bad input line found then, or Ctrl-C, must
    # reach the user as itself, not as "training failed".
    def texts():
        yield ENGLISH * 4
        raise error

    with pytest.raises(type(error)) as caught:
        train_tokenizer(kind, texts(), 300 if kind != "char" else None)
    assert caught.value is error


def test_unknown_kind_and_model_type():
    with pytest.raises(GptforgeError, match="unknown tokenizer kind 'wordpiece'"):
        train_tokenizer("wordpiece", ["x"])
    with pytest.raises(GptforgeError, match="unknown SentencePiece model type 'word'"):
        train_tokenizer("sentencepiece", [ENGLISH], 300, sp_model_type="word")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(GptforgeError, match="no such tokenizer file or directory: .*nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GptforgeError, match="empty: no tokenizer file in this directory"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "vocab.txt").write_text("x")
    with pytest.raises(GptforgeError, match="vocab.txt: unknown tokenizer file name"):
        load_tokenizer(tmp_path / "vocab.txt")
    both = tmp_path / "both"
    train_tokenizer("char", ["ab"]).save(both)
    train_tokenizer("bpe", [ENGLISH], 300).save(both)
    with pytest.raises(GptforgeError, match="holds several tokenizer files"):
        load_tokenizer(both)


@pytest.mark.parametrize("name, content, message", [
    ("chars.json", b"{not json", "cannot read char tokenizer"),
    ("chars.json", b'{"format": "other"}', "not a gptforge char tokenizer"),
    ("tokenizer.json", b"{}", "not a valid tokenizers JSON file"),
    ("tokenizer.model", b"\x00garbage", "not a valid SentencePiece model"),
])
def test_corrupt_tokenizer_files(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(GptforgeError, match=message) as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path / name) in str(err.value)


def test_foreign_file_without_an_end_of_document_token_names_the_option(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE()).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(GptforgeError, match="tokenizer.json: the tokenizer has no token for the "
                                            "end of document role .eos.; .* --eos-token"):
        load_tokenizer(tmp_path)


# --------------------------------------------------------------------------- training options


def _cjk_corpus() -> str:
    """~1M characters of 4,100 distinct CJK characters: 2,000 common ones in 12-character lines
    and 2,100 rare ones, each once (0.2% of the text): SentencePiece at its default coverage
    keeps the common ones and writes most rare ones as bytes."""
    import random

    rng = random.Random(0)
    common = [chr(0x4E00 + i) for i in range(2000)]
    lines = ["".join(rng.choices(common, k=5)) + "，" + "".join(rng.choices(common[:300], k=5))
             + "。" for _ in range(80_000)]
    for j in range(2100):
        lines[j * 37] += chr(0x4E00 + 2000 + j)
    return "\n".join(lines)


@pytest.mark.slow
def test_sentencepiece_4000_pieces_on_chinese_with_character_coverage():
    text = _cjk_corpus()
    assert len(set(text)) > 4000
    with pytest.raises(GptforgeError, match="--vocab-size 4000 is too small.*lower "
                                            "--character-coverage"):
        train_tokenizer("sentencepiece", [text], 4000, character_coverage=1.0)
    tok = train_tokenizer("sentencepiece", [text], 4000, character_coverage=0.9995)
    assert tok.vocab_size == 4000
    rare = chr(0x4E00 + 4000)
    assert len(tok.encode(rare)) == 3  # not in the vocabulary: its three UTF-8 bytes
    sample = text[:2000]
    assert tok.decode(tok.encode(sample)) == sample
    assert len(tok.encode(sample)) < len(sample)  # common pairs were merged


@pytest.mark.parametrize("kind, size", [("bpe", 300), ("sentencepiece", 300)])
def test_split_digits_and_user_symbols(kind, size):
    text = "order 123456 cost 987654 <think>why</think> " * 40
    plain = train_tokenizer(kind, [text], size)
    tok = train_tokenizer(kind, [text], size, split_digits=True, user_symbols=["<think>"])
    assert len(plain.encode("123456")) < 6  # merged digits without the option
    assert [tok.decode([i]) for i in tok.encode("123456")] == list("123456")
    assert len(tok.encode("<think>")) == 1 and len(plain.encode("<think>")) > 1
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_max_piece_length(kind):
    text = "abcdefghij " * 50

    def longest(tok) -> int:
        return max(len(tok.decode([i])) for i in tok.encode(text))

    assert longest(train_tokenizer(kind, [text], 290)) > 3
    assert longest(train_tokenizer(kind, [text], 290, max_piece_length=3)) <= 3


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_nfkc_on_and_off(kind):
    text = "ＡＢＣ１２３ ﬁne café " * 20  # full-width letters and digits, an ﬁ ligature
    exact = train_tokenizer(kind, [text], 300)
    nfkc = train_tokenizer(kind, [text], 300, nfkc=True)
    assert exact.decode(exact.encode(text)) == text  # off: every character as written
    assert nfkc.decode(nfkc.encode(text)) == ("ABC123 fine café " * 20)
    assert nfkc.encode("ＡＢＣ") == nfkc.encode("ABC")
    assert exact.encode("ＡＢＣ") != exact.encode("ABC")


def test_options_that_do_not_apply_are_refused():
    with pytest.raises(GptforgeError, match="--character-coverage does not apply to a bpe "
                                            "tokenizer .it applies to: sentencepiece."):
        train_tokenizer("bpe", [ENGLISH], 300, character_coverage=0.99)
    with pytest.raises(GptforgeError, match="--split-digits does not apply to a char"):
        train_tokenizer("char", [ENGLISH], split_digits=True)
    with pytest.raises(GptforgeError, match="--character-coverage must be between 0.5 and 1"):
        train_tokenizer("sentencepiece", [ENGLISH], 300, character_coverage=1.5)
