"""Import from the Hugging Face layout: the imported model computes transformers' logits.

Each test builds a tiny random model with ``transformers`` from a config, saves it with
``save_pretrained`` beside a tiny BPE tokenizer (nothing is downloaded), imports it, and compares
the logits on the same ids; import -> export -> import must give back the same weights and config.
"""

from __future__ import annotations

import json

import pytest
import torch

from gptforge.checkpoints.export import export_checkpoint
from gptforge.checkpoints.format import read_meta
from gptforge.checkpoints.hf_import import import_huggingface
from gptforge.checkpoints.loading import build_model
from gptforge.cli import main
from gptforge.tokenizer import load_tokenizer
from tests.tiny_hf import CONFIGS, make_hf_model

transformers = pytest.importorskip("transformers")

def ids(n=40):
    return torch.randint(0, 290, (2, n), generator=torch.Generator().manual_seed(1))


def assert_same_logits(hf_model, ckpt):
    ours = build_model(ckpt)
    x = ids()
    with torch.no_grad():
        theirs, mine = hf_model(x).logits, ours(x)
    assert mine.shape == theirs.shape  # no padding rows: the checkpoint's vocabulary as it is
    assert theirs.abs().max() > 0.5  # not a degenerate model
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_imported_model_computes_transformers_logits(tmp_path, name):
    hf_model = make_hf_model(tmp_path / "hf", name)
    ckpt = import_huggingface(tmp_path / "hf", tmp_path / "ckpt")
    assert_same_logits(hf_model, ckpt)
    tokenizer = load_tokenizer(ckpt / "tokenizer")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "hello world, the lazy fox<|endoftext|>"
    assert tokenizer.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.eos_id == hf_tok.eos_token_id


@pytest.mark.parametrize("variant", ["sharded-safetensors", "pytorch-bin"])
def test_sharded_and_pytorch_bin_checkpoints(tmp_path, variant):
    def save(model, directory):
        if variant == "pytorch-bin":  # the layout older transformers wrote
            directory.mkdir(parents=True)
            model.config.save_pretrained(directory)
            torch.save(model.state_dict(), directory / "pytorch_model.bin")
        else:
            model.save_pretrained(directory, max_shard_size="20KB")

    hf_model = make_hf_model(tmp_path / "hf", "llama", save)
    if variant != "pytorch-bin":
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert_same_logits(hf_model, import_huggingface(tmp_path / "hf", tmp_path / "ckpt"))


@pytest.mark.parametrize("name", ["gpt2", "qwen3", "mixtral", "gpt2-exact-gelu",
                                  "llama-exact-geglu"])
def test_import_export_import_is_the_identity(tmp_path, name):
    make_hf_model(tmp_path / "hf", name)
    first = import_huggingface(tmp_path / "hf", tmp_path / "first")
    export_checkpoint(first, tmp_path / "exported", format="huggingface")
    second = import_huggingface(tmp_path / "exported", tmp_path / "second")
    assert read_meta(first)["model"] == read_meta(second)["model"]
    a, b = build_model(first).state_dict(), build_model(second).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_block_size_caps_the_context(tmp_path):
    hf_model = make_hf_model(tmp_path / "hf", "gpt2")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"),
                 "--block-size", "48"]) == 0
    model = build_model(tmp_path / "ckpt")
    assert model.config.block_size == 48
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf_model(x).logits, rtol=1e-5, atol=1e-5)


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, named", [
    ({"model_type": "bert"}, "model_type 'bert'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     "rope_parameters"),
    ({"hidden_act": "gelu_fast"}, "hidden_act=gelu_fast"),
    ({"attention_bias": True}, "attention_bias=True with mlp_bias=False"),
])
def test_what_gptforge_cannot_express_is_refused_naming_the_setting(tmp_path, capsys, changes,
                                                                      named):
    make_hf_model(tmp_path / "hf", "llama")
    _edit_config(tmp_path / "hf", **changes)
    capsys.readouterr()  # transformers' progress output
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and named in err, err
    assert not (tmp_path / "ckpt").exists()


def test_sliding_window_and_missing_shard_are_refused(tmp_path, capsys):
    make_hf_model(tmp_path / "mixtral", "mixtral")
    _edit_config(tmp_path / "mixtral", sliding_window=16)
    capsys.readouterr()
    assert main(["import", str(tmp_path / "mixtral"), "--out", str(tmp_path / "a")]) == 1
    assert "sliding_window=16" in capsys.readouterr().err
    make_hf_model(tmp_path / "sharded", "llama",
                  lambda m, d: m.save_pretrained(d, max_shard_size="20KB"))
    next((tmp_path / "sharded").glob("model-00002-*.safetensors")).unlink()
    capsys.readouterr()
    assert main(["import", str(tmp_path / "sharded"), "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "missing shard model-00002" in err and err.count("\n") == 1


def test_a_directory_without_tokenizer_or_with_pickled_code_is_refused(tmp_path, capsys):
    make_hf_model(tmp_path / "hf", "llama")
    (tmp_path / "hf" / "tokenizer.json").unlink()
    capsys.readouterr()
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "a")]) == 1
    assert "no tokenizer.json" in capsys.readouterr().err

    make_hf_model(tmp_path / "bin", "llama", lambda m, d: m.config.save_pretrained(d))
    torch.save({"weights": object()}, tmp_path / "bin" / "pytorch_model.bin")
    capsys.readouterr()
    assert main(["import", str(tmp_path / "bin"), "--out", str(tmp_path / "b")]) == 1
    assert "was refused" in capsys.readouterr().err
