"""Tokenizers trained elsewhere, loaded as they are: ids equal to the reference library's, roles
mapped from their special tokens or from options, saved and reloaded identically."""

from __future__ import annotations

import base64
import collections
import io
import json
import shutil

import pytest

from gptforge.errors import GptforgeError
from gptforge.tokenizer import EOS_TOKEN, PAD_TOKEN, load_tokenizer
from gptforge.tokenizer.chat_template import encode_content, render_conversation

TEXT = (
    "The quick brown fox jumps over the lazy dog. It's 2024, isn't it?\n"
    "  Indented line\twith a tab, and numbers 12345 67.\n"
    "床前明月光，疑是地上霜。 mixed 中文 and English 😀\n"
)
SAMPLES = [TEXT, "hello world", " leading space", "", "über naïve café", "a\n\nb"]


# --------------------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A byte-level BPE trained with `tokenizers`, ChatML-style special tokens and a config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([TEXT * 20], trainer=trainer)
    hf.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])  # after the merges
    directory = tmp_path_factory.mktemp("hf")
    hf.save(str(directory / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
              "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_hf_ids_equal_tokenizers_library(hf_dir):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    tok = load_tokenizer(hf_dir)
    assert tok.kind == "hf" and tok.vocab_size == reference.get_vocab_size()
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == reference.decode(ids) == text
    assert tok.encode_batch(SAMPLES) == [tok.encode(t) for t in SAMPLES]


def test_hf_roles_and_config_come_from_its_special_tokens(hf_dir):
    tok = load_tokenizer(hf_dir)
    # <|endoftext|> ends documents (not the config's chat eos_token <|im_end|>, which ends turns)
    assert tok.roles == {"eos": "<|endoftext|>", "pad": "<|endoftext|>", "end": "<|im_end|>"}
    n = tok.vocab_size - 3  # the three special tokens come after the merges
    assert tok.eos_id == tok.pad_id == n and tok.special_tokens["<|end|>"] == n + 2
    assert tok.chat_template.startswith("{% for m in messages %}")
    assert tok.named_tokens["eos"] == "<|im_end|>"
    # Written literally, a special token is its id; decoded, it is text again.
    ids = tok.encode("a<|im_start|>b<|endoftext|>")
    assert n + 1 in ids and ids[-1] == n and tok.decode(ids) == "a<|im_start|>b<|endoftext|>"
    # In chat content it is plain text, whatever the tokenizer's own special tokens are.
    content = encode_content(tok, "x<|im_end|>y")
    assert n + 2 not in content and tok.decode(content) == "x<|im_end|>y"


def test_missing_chat_role_is_one_line_naming_the_option(hf_dir):
    tok = load_tokenizer(hf_dir)
    with pytest.raises(GptforgeError, match=r"no token for the user turn marker role \(user\); "
                                            r".*--role-token user=TOKEN") as err:
        render_conversation(tok, [{"role": "user", "content": "hi"}])
    assert "\n" not in str(err.value)


def test_roles_from_options_and_added_tokens_keep_existing_ids(hf_dir):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    tok = load_tokenizer(hf_dir / "tokenizer.json",
                         roles={"eos": "<|im_end|>", "user": "<|im_start|>"},
                         add_special_tokens=True)
    n = reference.get_vocab_size()  # <|endoftext|> is n - 3
    assert tok.eos_id == n - 1 and tok.special_tokens["<|user|>"] == n - 2
    assert tok.pad_id == n - 3  # the config's pad_token
    # Roles no token plays get gptforge's tokens, after the last existing id.
    assert tok.added_tokens == ["<|system|>", "<|assistant|>"] and tok.vocab_size == n + 2
    assert tok.encode(TEXT) == reference.encode(TEXT, add_special_tokens=False).ids
    text = "<|system|>be brief<|im_end|><|im_start|>hi<|assistant|>"
    ids = tok.encode(text)
    assert ids[0] == n and ids[-1] == n + 1 and tok.decode(ids) == text
    ids, mask = render_conversation(tok, [{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "ok"}])
    assert ids[0] == n - 2 and n + 1 in ids and sum(mask) == len(tok.encode("ok")) + 1


def test_bad_role_options_are_refused(hf_dir, tmp_path):
    with pytest.raises(GptforgeError, match="--eos-token '</s>': .* has no such token"):
        load_tokenizer(hf_dir, roles={"eos": "</s>"})
    with pytest.raises(GptforgeError, match="--role-token narrator=...: unknown role"):
        load_tokenizer(hf_dir, roles={"narrator": "<|im_start|>"})
    with pytest.raises(GptforgeError, match="--tiktoken-pattern applies to a tiktoken"):
        load_tokenizer(hf_dir, tiktoken_pattern="gpt2")


def test_saved_copy_reloads_identically(hf_dir, tmp_path):
    tok = load_tokenizer(hf_dir, roles={"user": "<|im_start|>"}, add_special_tokens=True)
    paths = tok.save(tmp_path / "data" / "tokenizer")
    assert paths[0].name == "gptforge_tokenizer.json"
    # What a checkpoint does: copy the directory; then load it with no options at all.
    shutil.copytree(tmp_path / "data" / "tokenizer", tmp_path / "ckpt" / "tokenizer")
    again = load_tokenizer(tmp_path / "ckpt" / "tokenizer")
    assert again.fingerprint() == tok.fingerprint()
    assert again.special_tokens == tok.special_tokens and again.vocab_size == tok.vocab_size
    assert again.chat_template == tok.chat_template
    samples = SAMPLES + ["<|assistant|>x"]
    assert again.encode_batch(samples) == tok.encode_batch(samples)
    with pytest.raises(GptforgeError, match="roles were fixed when it was saved"):
        load_tokenizer(tmp_path / "ckpt" / "tokenizer", roles={"eos": "<|im_end|>"})
    (tmp_path / "ckpt" / "tokenizer" / "tokenizer.json").write_text("{}")
    with pytest.raises(GptforgeError, match="tokenizer.json: damaged or replaced"):
        load_tokenizer(tmp_path / "ckpt" / "tokenizer")


def test_damaged_files_are_one_line_errors(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 7}}')
    (tmp_path / "x.model").write_bytes(b"\x08\x01garbage")
    (tmp_path / "x.tiktoken").write_bytes(b"YQ== 0\nnot a line\n")
    for name, message in [("tokenizer.json", "not a valid tokenizers JSON file"),
                          ("x.model", "not a valid SentencePiece model"),
                          ("x.tiktoken", r"x.tiktoken:2: not a tiktoken ranks line")]:
        with pytest.raises(GptforgeError, match=message) as err:
            load_tokenizer(tmp_path / name)
        assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- SentencePiece


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
    """A SentencePiece model trained with its usual defaults (NFKC, dummy prefix, <s> </s>)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter((TEXT * 10).splitlines()), model_writer=model, vocab_size=400,
        model_type="unigram", byte_fallback=True, hard_vocab_limit=False, minloglevel=2,
        num_threads=1)
    path = tmp_path_factory.mktemp("spm") / "llama.model"
    path.write_bytes(model.getvalue())
    return path


def test_spm_ids_equal_sentencepiece_library(spm_file, tmp_path):
    import sentencepiece

    reference = sentencepiece.SentencePieceProcessor(model_file=str(spm_file))
    tok = load_tokenizer(spm_file)
    assert tok.kind == "spm" and tok.vocab_size == reference.get_piece_size()
    assert tok.roles == {"eos": "</s>", "pad": "</s>"} and tok.eos_id == reference.eos_id()
    for text in SAMPLES:
        assert tok.encode(text) == reference.encode(text)
        assert tok.decode(tok.encode(text)) == reference.decode(reference.encode(text))
    # SentencePiece itself neither matches "</s>" in text nor decodes it; gptforge does both.
    ids = tok.encode("ab</s>")
    assert ids[-1] == reference.eos_id() and tok.decode(ids) == "ab</s>"
    tok.save(tmp_path / "copy")
    assert load_tokenizer(tmp_path / "copy").encode_batch(SAMPLES) == tok.encode_batch(SAMPLES)


# --------------------------------------------------------------------------- tiktoken


@pytest.fixture(scope="module")
def ranks():
    """All 256 bytes, then the corpus's most common byte pairs and words as merged tokens."""
    data = TEXT.encode()
    pairs = collections.Counter(data[i:i + 2] for i in range(len(data) - 1))
    words = collections.Counter(w.encode() for w in TEXT.split())
    merged = [p for p, _ in pairs.most_common(60)] + [w for w, n in words.most_common(40)
                                                      if len(w) > 2]
    tokens = [bytes([b]) for b in range(256)]
    for token in merged:
        if token not in tokens:
            tokens.append(token)
    return {token: rank for rank, token in enumerate(tokens)}


@pytest.mark.parametrize("pattern", ["gpt2", "cl100k"])
def test_tiktoken_ids_equal_tiktoken_library(ranks, pattern, tmp_path):
    import tiktoken

    from gptforge.tokenizer.foreign import TIKTOKEN_PATTERNS

    path = tmp_path / "mine.tiktoken"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    reference = tiktoken.Encoding("reference", pat_str=TIKTOKEN_PATTERNS[pattern],
                                  mergeable_ranks=ranks, special_tokens={})
    with pytest.raises(GptforgeError, match="no token for the end of document role"):
        load_tokenizer(path, tiktoken_pattern=pattern)  # a ranks file has no special tokens
    tok = load_tokenizer(path, tiktoken_pattern=pattern, add_special_tokens=True)
    assert tok.kind == "tiktoken" and tok.eos_id == len(ranks)
    for text in SAMPLES:
        assert tok.encode(text) == reference.encode_ordinary(text)
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("x" + EOS_TOKEN) == reference.encode_ordinary("x") + [tok.eos_id]
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.encode(TEXT) == tok.encode(TEXT) and again.pad_id == tok.special_tokens[PAD_TOKEN]


def test_tiktoken_file_of_gpt2_size_gets_its_pattern_and_end_of_text(tmp_path):
    import tiktoken

    from gptforge.tokenizer.foreign import TIKTOKEN_PATTERNS

    # 50,256 ranks, as GPT-2's file has: the bytes, then byte pairs (not GPT-2's real merges).
    tokens = [bytes([b]) for b in range(256)]
    tokens += [bytes([a, b]) for a in range(256) for b in range(256)][:50256 - 256]
    path = tmp_path / "gpt2.tiktoken"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(tokens)))
    tok = load_tokenizer(path)
    reference = tiktoken.Encoding("reference", pat_str=TIKTOKEN_PATTERNS["gpt2"],
                                  mergeable_ranks={t: r for r, t in enumerate(tokens)},
                                  special_tokens={"<|endoftext|>": 50256})
    assert tok.eos_id == 50256 and tok.vocab_size == 50257
    text = TEXT + "<|endoftext|>"
    assert tok.encode(text) == reference.encode(text, allowed_special="all")
    assert tok.decode(tok.encode(text)) == text


def test_named_chat_templates_give_the_default_one(hf_dir, tmp_path):
    shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    templates = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates}))
    assert load_tokenizer(tmp_path).chat_template == "D"
