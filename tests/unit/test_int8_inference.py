"""Weight-only int8 inference: close to float32, smaller, and reachable from the CLI and API."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gptforge
from gptforge.cli import main
from gptforge.errors import GptforgeError
from gptforge.inference.int8 import Int8Linear, quantize_int8, weight_bytes
from gptforge.model import GPT
from tests.tiny_checkpoints import make_base, tiny_config

LLAMA_MOE = dict(norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=False, n_kv_head=1,
                 n_experts=4, moe_every=2)


def test_int8_linear_matches_the_float_layer_within_its_rounding():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    quantized = Int8Linear(linear)
    assert quantized.weight_int8.dtype == torch.int8
    # Rounding moves each weight by at most half a step of its row's scale.
    dequantized = quantized.weight_int8.float() * quantized.scale[:, None]
    assert ((dequantized - linear.weight).abs() <= quantized.scale[:, None] / 2 + 1e-7).all()
    for x in (torch.randn(2, 5, 64), torch.randn(0, 64)):  # batches, and no rows (idle expert)
        with torch.no_grad():
            expected = x @ dequantized.t() + linear.bias
            torch.testing.assert_close(quantized(x), expected, rtol=1e-5, atol=1e-5)
            assert quantized(x).shape == linear(x).shape


@pytest.mark.parametrize("settings", [{}, LLAMA_MOE])
def test_quantized_model_stays_close_and_shrinks(settings):
    torch.manual_seed(0)
    model = GPT(tiny_config(300, n_embd=64, n_head=4, init_std=0.1, **settings)).eval()
    x = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        expected = model(x)
        before = weight_bytes(model)
        quantize_int8(model)
        got = model(x)
    kinds = {type(m).__name__ for name, m in model.named_modules() if name.startswith("blocks")}
    assert "Int8Linear" in kinds
    assert ("Linear" in kinds) == bool(settings)  # only MoE routers stay float in the blocks
    assert isinstance(model.lm_head, nn.Linear)
    assert weight_bytes(model) < before
    errors = (got - expected).abs().amax(-1).flatten() / expected.abs().max()  # per position
    assert 0 < errors.median() < 0.02
    # A token whose router input moves across a tie picks another expert: a jump, but rare.
    assert (errors < 0.03).float().mean() > 0.95


def test_generate_and_load_with_int8(tmp_path, capsys):
    ckpt, _, _ = make_base(tmp_path, init_std=0.1)
    generator = gptforge.load(ckpt, device="cpu", quantize="int8")
    assert isinstance(generator.model.blocks[0].attn.qkv, Int8Linear)
    assert generator.generate("hello", max_new_tokens=5, temperature=0) is not None
    assert main(["generate", str(ckpt), "--quantize", "int8", "--prompt", "hi",
                 "--max-new-tokens", "4", "--temperature", "0", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["generate", str(ckpt), "--quantize", "int8", "--compile"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be combined with --compile" in err[0]
    with pytest.raises(GptforgeError, match="--quantize int4"):
        gptforge.load(ckpt, device="cpu", quantize="int4")
