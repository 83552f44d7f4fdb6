"""Tokenizer options through the CLI: `prepare --tokenizer PATH` with a tokenizer trained
elsewhere, `tokenizer import`, and the training options of `tokenizer train` and `prepare`."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from gptforge.cli import main
from gptforge.data.shards import open_split
from gptforge.tokenizer import load_tokenizer
from tests.conftest import make_corpus_text


@pytest.fixture(scope="module")
def hf_file(tmp_path_factory):
    """A Hugging Face byte-level BPE with GPT-2's <|endoftext|> and ChatML's markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([make_corpus_text(200)], trainer=trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    directory = tmp_path_factory.mktemp("hf")
    hf.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    return directory / "tokenizer.json"


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(make_corpus_text(100))
    return path


def _prepare(corpus, out, tokenizer, *options) -> int:
    return main(["prepare", "--input", str(corpus), "--tokenizer", str(tokenizer), "--out",
                 str(out), "--workers", "1", "--no-progress", *options])


def test_prepare_with_a_hugging_face_tokenizer_keeps_its_ids(hf_file, corpus, tmp_path):
    from tokenizers import Tokenizer

    out = tmp_path / "data"
    assert _prepare(corpus, out, hf_file, "--role-token", "end=<|im_end|>",
                    "--val-fraction", "0") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    reference = Tokenizer.from_file(str(hf_file))
    eos = reference.token_to_id("<|endoftext|>")
    assert manifest["tokenizer"]["kind"] == "hf" and manifest["tokenizer"]["eos_id"] == eos
    tokens = np.concatenate(open_split(out, "train"))
    expected = reference.encode(corpus.read_text(), add_special_tokens=False).ids + [eos]
    assert tokens.tolist() == expected
    # The data directory's tokenizer (what checkpoints copy) is the same tokenizer.
    saved = load_tokenizer(out / "tokenizer")
    assert saved.fingerprint() == manifest["tokenizer"]["sha256"]
    assert saved.special_tokens["<|end|>"] == reference.token_to_id("<|im_end|>")
    assert saved.decode(tokens.tolist()) == corpus.read_text() + "<|endoftext|>"


def test_tokenizer_import_then_prepare_from_its_directory(hf_file, corpus, tmp_path, capsys):
    assert main(["tokenizer", "import", str(hf_file.parent), "--out", str(tmp_path / "tok"),
                 "--role-token", "user=<|im_start|>", "--add-special-tokens"]) == 0
    assert "user=<|im_start|> (id " in capsys.readouterr().out
    imported = load_tokenizer(tmp_path / "tok")
    assert imported.added_tokens == ["<|pad|>", "<|system|>", "<|assistant|>"]  # end: <|im_end|>
    assert _prepare(corpus, tmp_path / "data", tmp_path / "tok") == 0
    assert load_tokenizer(tmp_path / "data" / "tokenizer").fingerprint() == imported.fingerprint()


def test_a_role_nothing_fills_is_one_line(corpus, tmp_path, capsys):
    ranks = tmp_path / "mine.tiktoken"
    ranks.write_bytes(b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(256)))
    assert _prepare(corpus, tmp_path / "data", ranks) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "end of document role (eos)" in err and "--eos-token" in err
    assert _prepare(corpus, tmp_path / "data", ranks, "--add-special-tokens",
                    "--tiktoken-pattern", "cl100k") == 0


@pytest.mark.parametrize("tokenizer, option, message", [
    ("bpe", ["--eos-token", "</s>"], "applies to a tokenizer trained elsewhere"),
    ("HF", ["--nfkc"], "--nfkc applies when training a tokenizer"),
    ("bpe", ["--character-coverage", "0.99"], "--character-coverage does not apply to a bpe"),
    ("HF", ["--role-token", "end"], "--role-token end: expected ROLE=TOKEN"),
])
def test_options_that_do_not_apply_are_refused(hf_file, corpus, tmp_path, capsys, tokenizer,
                                               option, message):
    tokenizer = hf_file if tokenizer == "HF" else tokenizer
    assert _prepare(corpus, tmp_path / "data", tokenizer, "--vocab-size" if tokenizer == "bpe"
                    else "--seed", "300" if tokenizer == "bpe" else "1", *option) == 1
    assert message in capsys.readouterr().err


def test_training_options_on_the_command_line(corpus, tmp_path, capsys):
    text = make_corpus_text(100) + "\nscore 123456 <think>\n" * 50
    corpus.write_text(text)
    assert main(["tokenizer", "train", "--input", str(corpus), "--kind", "sentencepiece",
                 "--vocab-size", "400", "--character-coverage", "0.999", "--split-digits",
                 "--user-symbols", "<think>", "--max-piece-length", "4",
                 "--out", str(tmp_path / "tok")]) == 0
    tok = load_tokenizer(tmp_path / "tok")
    assert len(tok.encode("<think>")) == 1 and len(tok.encode("123456")) == 6
    learned = tok.encode(text.replace("<think>", ""))  # user symbols may be longer
    assert max(len(tok.decode([i])) for i in learned) <= 4
    assert _prepare(corpus, tmp_path / "data", "bpe", "--vocab-size", "300", "--nfkc") == 0
    nfkc = load_tokenizer(tmp_path / "data" / "tokenizer")
    assert nfkc.encode("ＲＯＭＥＯ") == nfkc.encode("ROMEO")


@pytest.mark.slow
def test_a_foreign_tokenizer_survives_training_into_checkpoints(hf_file, corpus, tmp_path,
                                                                capsys):
    import gptforge

    data, run = tmp_path / "data", tmp_path / "run"
    assert _prepare(corpus, data, hf_file, "--add-special-tokens") == 0
    assert main(["train", "-c", "tiny", f"data.dir={data}", f"train.out_dir={run}",
                 "train.max_steps=2", "runtime.progress=false", "runtime.device=cpu"]) == 0
    ckpt = run / "ckpt" / "step-000002" / "tokenizer"
    assert load_tokenizer(ckpt).fingerprint() == load_tokenizer(data / "tokenizer").fingerprint()
    model = gptforge.load(run)
    assert model.tokenizer.kind == "hf"
    assert isinstance(model.generate("ROMEO:", max_new_tokens=5, seed=0), str)
