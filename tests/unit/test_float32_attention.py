"""Float32 attention under bf16 autocast (``CausalSelfAttention.float32_sdpa``)."""

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from gptforge.model import GPT, ModelConfig, attention
from gptforge.model.attention import CausalSelfAttention
from gptforge.runtime.device import Precision, use_float32_attention


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                           block_size=16))


def test_float32_attention_runs_sdpa_in_float32_and_trains(monkeypatch):
    seen = []

    def recording_sdpa(q, k, v, **kwargs):
        seen.append(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, **kwargs)

    model = tiny()
    idx = torch.randint(0, 50, (2, 16))
    exact = model(idx)
    recorder = SimpleNamespace(scaled_dot_product_attention=recording_sdpa)
    monkeypatch.setattr(attention, "F", recorder)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx)
    assert seen == [torch.bfloat16] * 2
    seen.clear()
    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            module.float32_sdpa = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(idx).float()
    assert seen == [torch.float32] * 2
    mixed.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    torch.testing.assert_close(mixed, exact, atol=0.05, rtol=0.05)


def test_left_alone_without_bf16_autocast_on_a_cpu():
    model = tiny()
    assert not use_float32_attention(model, Precision(torch.device("cpu"), torch.float32))
    assert not use_float32_attention(model, Precision(torch.device("cuda"), torch.bfloat16))
    assert not any(m.float32_sdpa for m in model.modules()
                   if isinstance(m, CausalSelfAttention))
