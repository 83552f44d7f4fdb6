"""Export to the Hugging Face layout: transformers computes the same logits, tokenizes the same.

The parity tests load the export with ``transformers`` (a dev dependency; nothing is downloaded:
the export directory is all it reads) and compare with the gptforge model on the same ids.
"""

from __future__ import annotations

import json

import pytest
import torch

from gptforge.checkpoints.export import export_checkpoint
from gptforge.checkpoints.huggingface import CHAT_TEMPLATE, architecture_of, char_tokenizer_json
from gptforge.cli import main
from gptforge.errors import GptforgeError
from gptforge.model import GPT, ModelConfig
from gptforge.tokenizer.chat_template import render_prompt, render_text
from tests.tiny_checkpoints import make_tokenizer, save_model

LLAMA = dict(norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=False)
ARCHS = {
    "gpt2": ({}, "GPT2LMHeadModel"),
    "gpt2-no-bias-untied": ({"bias": False, "tie_embeddings": False}, "GPT2LMHeadModel"),
    "llama-gqa-untied": ({**LLAMA, "n_kv_head": 1, "tie_embeddings": False}, "LlamaForCausalLM"),
    "llama-bias-theta": ({**LLAMA, "bias": True, "rope_theta": 500.0}, "LlamaForCausalLM"),
    "qwen3": ({**LLAMA, "qk_norm": True, "n_kv_head": 2}, "Qwen3ForCausalLM"),
    "mixtral": ({**LLAMA, "n_experts": 4, "moe_top_k": 2, "n_kv_head": 2},
                "MixtralForCausalLM"),
    # Architecture switches (docs/architecture.md) that a transformers class has.
    "llama-geglu-head-dim": ({**LLAMA, "mlp": "geglu", "head_dim": 12}, "LlamaForCausalLM"),
    "gpt2-exact-gelu": ({"gelu_approximate": "none"}, "GPT2LMHeadModel"),
    "llama-exact-geglu": ({**LLAMA, "mlp": "geglu", "gelu_approximate": "none"},
                          "LlamaForCausalLM"),
    "qwen3-reglu-head-dim": ({**LLAMA, "mlp": "reglu", "qk_norm": True, "n_kv_head": 2,
                              "head_dim": 4}, "Qwen3ForCausalLM"),
    "mixtral-geglu": ({**LLAMA, "mlp": "geglu", "n_experts": 4, "n_kv_head": 2, "head_dim": 16},
                      "MixtralForCausalLM"),
    "qwen3-next-gated": ({**LLAMA, "attn_gate": "channel", "qk_norm": True, "n_kv_head": 2,
                          "head_dim": 12}, "Qwen3NextForCausalLM"),
}
TEXT = "hello, how are you? I am fine.\nABC <|user|>x<|end|>"


def tiny_export(tmp_path, **arch):
    tokenizer = make_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    # A wide init spread makes the logits differ clearly from token to token.
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_embd=32,
                      block_size=64, init_std=0.2, **arch)
    model = GPT(cfg).eval()
    ckpt = save_model(tmp_path / "run", model, tokenizer, tmp_path / "tok")
    out = export_checkpoint(ckpt, tmp_path / "hf", format="huggingface")
    return model, tokenizer, out


@pytest.mark.parametrize("name", ARCHS)
def test_transformers_computes_the_same_logits(tmp_path, monkeypatch, name):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    arch, hf_class = ARCHS[name]
    if not hasattr(transformers, hf_class):  # Qwen3-Next came with transformers 4.57
        pytest.skip(f"this transformers {transformers.__version__} has no {hf_class}")
    model, tokenizer, out = tiny_export(tmp_path, **arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == hf_class
    x = torch.randint(0, tokenizer.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert ours.abs().max() > 1  # not a degenerate model
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_transformers_tokenizer_and_chat_template_agree(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, tokenizer, out = tiny_export(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert hf(TEXT, add_special_tokens=False)["input_ids"] == tokenizer.encode(TEXT)
    assert hf.decode(tokenizer.encode(TEXT)) == TEXT
    assert hf.eos_token == "<|endoftext|>" and hf.pad_token == "<|pad|>"
    messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi"}, {"role": "user", "content": "how are you?"}]
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert list(ids) == render_prompt(tokenizer, messages)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.special_tokens["<|end|>"], tokenizer.eos_id]


def test_char_tokenizer_json_round_trips(tmp_path):
    """Without transformers: the tokenizers library alone reads the exported char vocabulary."""
    from tokenizers import Tokenizer

    tokenizer = make_tokenizer(tmp_path / "tok")
    path = tmp_path / "tokenizer.json"
    char_tokenizer_json(tokenizer).save(str(path))
    hf = Tokenizer.from_file(str(path))
    for text in (TEXT, "a\n\nb  c", "<|endoftext|><|pad|>", ""):
        ids = hf.encode(text, add_special_tokens=False).ids
        assert ids == tokenizer.encode(text)
        assert hf.decode(ids, skip_special_tokens=False) == text


def test_chat_template_renders_like_gptforge():
    """The Jinja template gives the same text as gptforge's renderer (jinja2 comes with torch)."""
    import jinja2

    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]

    def raise_exception(message):
        raise ValueError(message)

    template = jinja2.Environment().from_string(CHAT_TEMPLATE)
    text = template.render(messages=messages, add_generation_prompt=True,
                           raise_exception=raise_exception)
    assert text == render_text(messages) + "<|assistant|>"
    with pytest.raises(ValueError, match="unknown role tool"):
        template.render(messages=[{"role": "tool", "content": "x"}],
                        raise_exception=raise_exception)


@pytest.mark.parametrize("settings, needs", [
    (dict(mlp="relu2"), "model.mlp=gelu"),
    (dict(n_kv_head=2), "model.n_kv_head=0"),
    (dict(logit_softcap=30.0), "model.logit_softcap=0"),
    ({**LLAMA, "qk_norm": True, "bias": True}, "model.bias=false"),
    ({**LLAMA, "n_experts": 4, "moe_top_k": 1}, "model.moe_top_k>=2"),
    ({**LLAMA, "n_experts": 4, "moe_every": 2}, "model.moe_every=1"),
    (dict(head_dim=16), "model.head_dim=0"),
    ({**LLAMA, "attn_gate": "channel"}, r"qwen3_next \(needs model.qk_norm=true\)"),
    (dict(pos_emb="sinusoidal"), "^model.pos_emb=sinusoidal has no Hugging Face transformers "
                                 "equivalent: GPT-2 learns its position table"),
    ({**LLAMA, "attn_gate": "head", "qk_norm": True}, "^model.attn_gate=head has no Hugging Face "
                                                      "transformers equivalent: Qwen3-Next"),
])
def test_models_without_a_transformers_equivalent_are_refused(settings, needs):
    cfg = ModelConfig(vocab_size=50, n_layer=1, n_head=4, n_embd=32, block_size=8, **settings)
    with pytest.raises(GptforgeError, match=needs):
        architecture_of(cfg)


def test_cli_export_and_its_errors(tmp_path, capsys):
    _, tokenizer, out = tiny_export(tmp_path)
    again = tmp_path / "again"
    assert main(["export", str(tmp_path / "run"), "--format", "huggingface",
                 "--out", str(again)]) == 0
    assert {p.name for p in again.iterdir()} >= {"config.json", "model.safetensors",
                                                 "tokenizer.json", "tokenizer_config.json",
                                                 "generation_config.json"}
    # An earlier export is replaced; a directory of something else is not.
    assert main(["export", str(tmp_path / "run"), "--format", "huggingface",
                 "--out", str(again)]) == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["export", str(tmp_path / "run"), "--format", "huggingface",
                 "--out", str(other)]) == 1
    assert "refusing to replace it" in capsys.readouterr().err
    torch.manual_seed(0)
    relu = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16,
                           block_size=8, mlp="relu2"))
    save_model(tmp_path / "relu", relu, tokenizer, tmp_path / "tok")
    assert main(["export", str(tmp_path / "relu"), "--format", "huggingface",
                 "--out", str(tmp_path / "relu-hf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no Hugging Face transformers equivalent" in err[0]
    assert not (tmp_path / "relu-hf").exists()


def test_cli_refuses_a_sinusoidal_export_in_one_line(tmp_path, capsys):
    tokenizer = make_tokenizer(tmp_path / "tok")
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16,
                            block_size=8, pos_emb="sinusoidal"))
    save_model(tmp_path / "run", model, tokenizer, tmp_path / "tok")
    assert main(["export", str(tmp_path / "run"), "--format", "huggingface",
                 "--out", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.pos_emb=sinusoidal has no Hugging Face" in err[0]
    assert not (tmp_path / "hf").exists()
    # The native format keeps it: the fixed table is rebuilt from model.json, not stored.
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "native")]) == 0
