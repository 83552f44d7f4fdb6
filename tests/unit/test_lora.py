"""LoRA adapters: the maths, training only the adapters, merging, adapter checkpoints, export."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from torch import nn

import gptforge
from gptforge.checkpoints.export import export_checkpoint
from gptforge.checkpoints.loading import build_model
from gptforge.cli import main
from gptforge.errors import GptforgeError
from gptforge.inference.sampling import SamplingSettings
from gptforge.inference.textgen import TextGenerator
from gptforge.model import GPT, ModelConfig
from gptforge.model.lora import (
    LoRALinear,
    apply_lora,
    lora_config_of,
    lora_parameters,
    lora_state_dict,
    merge_lora,
)
from tests.tiny_checkpoints import make_base, make_lora_checkpoint, randomize_adapters

ALL = ["qkv", "proj", "up", "down", "lm_head"]
CONFIGS = {
    "gpt2_tied": dict(),
    "llama_gqa": dict(norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=False, n_kv_head=1,
                      tie_embeddings=False),
    "moe": dict(n_experts=3, moe_top_k=2, moe_every=2),
}


def tiny_model(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=50, n_layer=2, n_head=2, n_embd=16, block_size=16),
                         **overrides})
    return GPT(cfg).eval()


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CONFIGS)
def test_adapted_model_equals_base_at_init(name):
    base = tiny_model(**CONFIGS[name])
    model = copy.deepcopy(base)
    wrapped = apply_lora(model, rank=4, alpha=8, dropout=0.0, targets=ALL)
    assert "blocks.0.attn.qkv" in wrapped and "lm_head" in wrapped
    if name == "moe":
        assert "blocks.1.mlp.experts.2.up" in wrapped
    x = batch()
    assert torch.equal(model(x), base(x))
    # Base parameters keep their names; adapters are added next to them.
    names = set(model.state_dict())
    assert set(base.state_dict()) <= names
    assert names - set(base.state_dict()) == set(lora_state_dict(model))


def test_training_updates_only_the_adapters():
    model = tiny_model(dropout=0.1)
    apply_lora(model, rank=4, alpha=8, dropout=0.1, targets=["qkv", "proj", "up", "down"])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapters)
    model.train()
    for step in range(3):  # B starts at 0, so A first moves on the second step
        x = batch(step)
        loss = nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        assert all((p.grad is not None) == ("lora_" in n) for n, p in model.named_parameters())
        with torch.no_grad():  # plain SGD by hand (a torch.optim step costs seconds to import)
            for p in lora_parameters(model):
                p -= 0.1 * p.grad
                p.grad = None
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert not torch.equal(p, adapters[n]), n
        else:
            assert torch.equal(p, frozen[n]), n


def test_update_is_scaled_by_alpha_over_rank_and_dropout_acts_only_in_training():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    lora = LoRALinear(base, rank=2, alpha=8, dropout=0.5).eval()
    with torch.no_grad():
        lora.lora_b.normal_()
    x = torch.randn(4, 6)

    def by_hand(adapter_input):  # W x + b + alpha / rank * B A x
        return x @ base.weight.T + base.bias + 4.0 * (adapter_input @ lora.lora_a.T @ lora.lora_b.T)

    expected = by_hand(x)
    torch.testing.assert_close(lora(x), expected)
    lora.train()
    torch.manual_seed(1)
    trained = lora(x)
    torch.manual_seed(1)  # the same dropout mask, on the adapter's input only
    torch.testing.assert_close(trained, by_hand(nn.functional.dropout(x, 0.5)))
    assert not torch.allclose(trained, expected)
    torch.testing.assert_close(lora.merged_linear()(x), expected)  # merges into W in place


@pytest.mark.parametrize("name", CONFIGS)
def test_merged_model_gives_the_same_logits(name):
    model = tiny_model(**CONFIGS[name])
    embedding = model.tok_emb.weight.detach().clone()
    apply_lora(model, rank=4, alpha=8, dropout=0.0, targets=ALL)
    randomize_adapters(model, std=0.2)
    x = batch()
    unmerged = model(x)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert isinstance(model.blocks[0].attn.qkv, nn.Linear)
    assert not lora_state_dict(model) and lora_config_of(model) == {}
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)
    assert torch.equal(model.tok_emb.weight, embedding)  # a tied lm_head was untied, not shared
    assert set(model.state_dict()) == set(tiny_model(**CONFIGS[name]).state_dict())


def test_state_dict_and_config_describe_only_the_adapters():
    model = tiny_model()
    apply_lora(model, rank=2, alpha=4, dropout=0.05, targets=["down", "attn.qkv"])
    state = lora_state_dict(model)
    assert sorted(state) == ["blocks.0.attn.qkv.lora_a", "blocks.0.attn.qkv.lora_b",
                             "blocks.0.mlp.down.lora_a", "blocks.0.mlp.down.lora_b",
                             "blocks.1.attn.qkv.lora_a", "blocks.1.attn.qkv.lora_b",
                             "blocks.1.mlp.down.lora_a", "blocks.1.mlp.down.lora_b"]
    assert state["blocks.0.attn.qkv.lora_a"].shape == (2, 16)
    assert state["blocks.0.attn.qkv.lora_b"].shape == (48, 2)
    config = lora_config_of(model)
    assert config == {"rank": 2, "alpha": 4.0, "dropout": 0.05, "targets": ["attn.qkv", "down"]}
    fresh = tiny_model()
    apply_lora(fresh, **config)  # the saved settings wrap the same layers
    assert set(lora_state_dict(fresh)) == set(state)


def test_invalid_targets_and_double_application_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown LoRA target.*'qkvv'.*lm_head, proj, qkv, up"):
        apply_lora(model, rank=4, alpha=8, dropout=0.0, targets=["qkv", "qkvv"])
    apply_lora(model, rank=4, alpha=8, dropout=0.0, targets=["qkv"])
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, rank=4, alpha=8, dropout=0.0, targets=["up"])


# ---- adapter checkpoints and export ------------------------------------------------------------

def greedy(generator, prompt: str = "hello") -> list[int]:
    ids = generator.tokenizer.encode(prompt)
    settings = SamplingSettings(max_new_tokens=12, temperature=0)
    return [int(step[0]) for step in generator.engine.generate(ids, settings)]


@pytest.fixture
def lora_ckpt(tmp_path):
    base, model, tokenizer = make_base(tmp_path)
    ckpt = make_lora_checkpoint(tmp_path, base, model, tokenizer)
    return ckpt, base, model, tokenizer


def test_lora_checkpoint_loads_as_the_adapted_model(lora_ckpt):
    ckpt, base, adapted, tokenizer = lora_ckpt
    meta = json.loads((ckpt / "model.json").read_text())
    assert meta["lora"]["targets"] == ["qkv", "proj", "up", "down"]
    merged = build_model(ckpt)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    unmerged = build_model(ckpt, merge=False)
    x = torch.randint(0, tokenizer.vocab_size, (1, 10))
    torch.testing.assert_close(merged(x), adapted(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(unmerged(x), adapted(x), atol=1e-6, rtol=0)
    assert not torch.allclose(merged(x), build_model(base)(x), atol=1e-3)  # adapters matter
    generator = gptforge.load(ckpt, device="cpu")
    assert greedy(generator) == greedy(TextGenerator(adapted, tokenizer))
    assert isinstance(generator.generate("hello", max_new_tokens=5, temperature=0), str)


def test_export_merges_into_a_self_contained_checkpoint(lora_ckpt, tmp_path, capsys):
    ckpt, base, _, _ = lora_ckpt
    expected = greedy(gptforge.load(ckpt, device="cpu"))
    out = tmp_path / "export"
    assert main(["export", str(ckpt), "--out", str(out)]) == 1
    assert "--merge-lora" in capsys.readouterr().err and not out.exists()
    assert main(["export", str(tmp_path / "sft"), "--out", str(out), "--merge-lora"]) == 0
    meta = json.loads((out / "model.json").read_text())
    assert "lora" not in meta and meta["merged_lora"]["base"] == str(base)
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors",
                                                      "tokenizer"]
    shutil.rmtree(base)  # the export needs nothing else
    assert greedy(gptforge.load(out, device="cpu")) == expected
    # Exporting again replaces an earlier export; a directory of other files is never touched.
    assert main(["export", str(out), "--out", str(tmp_path / "again")]) == 0
    assert main(["export", str(out), "--out", str(tmp_path / "again")]) == 0
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(GptforgeError, match="not a checkpoint; refusing"):
        export_checkpoint(out, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    with pytest.raises(GptforgeError, match="is the checkpoint being exported"):
        export_checkpoint(out, out)


def test_adapter_on_a_tied_output_layer_exports_untied(tmp_path):
    base, model, tokenizer = make_base(tmp_path)
    assert model.config.tie_embeddings
    ckpt = make_lora_checkpoint(tmp_path, base, model, tokenizer, targets=["qkv", "lm_head"])
    out = tmp_path / "export"
    export_checkpoint(ckpt, out, merge_lora=True)
    assert json.loads((out / "model.json").read_text())["model"]["tie_embeddings"] is False
    x = torch.randint(0, tokenizer.vocab_size, (1, 10))
    torch.testing.assert_close(build_model(out)(x), model(x), atol=1e-5, rtol=0)


def test_missing_or_changed_base_is_an_error(lora_ckpt, tmp_path):
    ckpt, base, _, _ = lora_ckpt
    meta_file = ckpt / "model.json"
    meta = json.loads(meta_file.read_text())
    # A relative base path is relative to the adapter checkpoint.
    meta["lora"]["base"] = "../../../base/ckpt/step-000001"
    meta_file.write_text(json.dumps(meta))
    build_model(ckpt)
    moved = tmp_path / "moved"
    shutil.move(base, moved)
    with pytest.raises(GptforgeError, match=r"base checkpoint .*step-000001, which is missing"):
        gptforge.load(ckpt, device="cpu")
    shutil.move(moved, base)
    meta["lora"]["base_sha256"] = "0" * 64
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(GptforgeError, match="have changed since the adapters"):
        gptforge.load(ckpt, device="cpu")


def test_adapters_that_do_not_fit_are_an_error(lora_ckpt):
    ckpt, _, _, _ = lora_ckpt
    meta_file = ckpt / "model.json"
    meta = json.loads(meta_file.read_text())
    meta["lora"]["targets"] = ["qkv"]  # the file also holds proj/up/down adapters
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(GptforgeError, match="adapter weights do not fit"):
        build_model(ckpt)
    meta["lora"]["targets"] = ["qkv", "proj", "up", "down"]
    meta["lora"]["rank"] = 8
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(GptforgeError, match="adapter weights do not fit"):
        build_model(ckpt)
