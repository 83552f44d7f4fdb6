import math

import pytest
import torch

from gptforge.inference.kv_cache import KVCache
from gptforge.model import GPT, ModelConfig
from gptforge.model.layers import MLP, apply_rope, rope_tables

LLAMA = dict(norm="rmsnorm", pos_emb="rope", mlp="swiglu", n_kv_head=2, qk_norm=True,
             bias=False, tie_embeddings=False)


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=50, n_layer=2, n_head=4, n_embd=32, block_size=24)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("arch", [{}, LLAMA, dict(mlp="relu2", logit_softcap=15.0)])
def test_kv_cache_decoding_matches_full_forward(arch):
    torch.manual_seed(0)
    assert_cached_decoding_matches_full_forward(GPT(tiny(**arch)).eval())


def assert_cached_decoding_matches_full_forward(model: GPT) -> None:
    """Prefill, a chunk after the cache, then one token at a time: the logits of a full forward."""
    idx = torch.randint(0, 50, (2, 20))
    full = model(idx)
    cache = KVCache.for_model(model, batch_size=2)
    pieces = [model(idx[:, :7], kv_cache=cache)]  # prefill
    pieces.append(model(idx[:, 7:10], kv_cache=cache))  # a chunk after a cache
    for t in range(10, 20):  # one token at a time
        pieces.append(model(idx[:, t:t + 1], kv_cache=cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-4)
    assert cache.pos == 20


def test_causality_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = GPT(tiny(**LLAMA)).eval()
    a = torch.randint(0, 50, (1, 16))
    b = a.clone()
    b[0, 10:] = torch.randint(0, 50, (6,))
    torch.testing.assert_close(model(a)[:, :10], model(b)[:, :10])


def test_grouped_query_attention_equals_repeated_heads():
    """GQA with n_kv_head=2 must equal MHA whose k/v heads are the GQA heads repeated."""
    torch.manual_seed(0)
    gqa = GPT(tiny(n_kv_head=2, n_layer=1)).eval()
    mha = GPT(tiny(n_layer=1)).eval()
    state = gqa.state_dict()
    w, b = state["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.bias"]
    hs, C = 8, 32
    q, k, v = w.split([C, 2 * hs, 2 * hs])
    qb, kb, vb = b.split([C, 2 * hs, 2 * hs])

    def rep(t):  # (2*hs, ...) -> (4*hs, ...): each kv head serves two query heads
        return t.view(2, hs, *t.shape[1:]).repeat_interleave(2, dim=0).reshape(4 * hs, *t.shape[1:])

    state["blocks.0.attn.qkv.weight"] = torch.cat([q, rep(k), rep(v)])
    state["blocks.0.attn.qkv.bias"] = torch.cat([qb, rep(kb), rep(vb)])
    mha.load_state_dict(state)
    idx = torch.randint(0, 50, (2, 12))
    torch.testing.assert_close(gqa(idx), mha(idx), atol=1e-5, rtol=1e-4)


def test_rope_preserves_norm_and_depends_on_relative_position():
    cos, sin = rope_tables(16, 64, 10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def rotated(x, pos):
        return apply_rope(x, cos[pos:pos + 1], sin[pos:pos + 1])

    torch.testing.assert_close(rotated(q, 5).norm(), q.norm())
    dot_a = (rotated(q, 10) * rotated(k, 7)).sum()
    dot_b = (rotated(q, 40) * rotated(k, 37)).sum()  # same distance, other place
    torch.testing.assert_close(dot_a, dot_b, atol=1e-5, rtol=1e-5)


def test_rope_and_gelu_follow_the_hugging_face_llama_and_gpt2_conventions():
    """What an export relies on: RoPE pairs channel i with i + hs/2 (Llama's "rotate half", no
    interleaving) at angle pos * theta^(-2i/hs); the GELU is GPT-2's tanh form ("gelu_new")."""
    hs, theta, pos = 8, 100.0, 3
    cos, sin = rope_tables(hs, 8, theta)
    x = torch.randn(hs)
    out = apply_rope(x.view(1, 1, 1, hs), cos[pos:pos + 1], sin[pos:pos + 1]).flatten()
    for i in range(hs // 2):
        angle = pos * theta ** (-2 * i / hs)
        a, b = x[i].item(), x[i + hs // 2].item()
        assert math.isclose(out[i], a * math.cos(angle) - b * math.sin(angle), abs_tol=1e-5)
        assert math.isclose(out[i + hs // 2], a * math.sin(angle) + b * math.cos(angle),
                            abs_tol=1e-5)
    mlp = MLP(tiny(n_embd=4, mlp_hidden=4, bias=False))
    with torch.no_grad():
        mlp.up.weight.copy_(torch.eye(4) * 3)
        mlp.down.weight.copy_(torch.eye(4))
    h = torch.tensor([-1.0, -0.3, 0.5, 1.7]) * 3
    gelu_new = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    torch.testing.assert_close(mlp(h / 3), gelu_new)


def test_parameter_count_matches_hand_computation():
    cfg = tiny(vocab_size=64, bias=True)
    C, V, T, L = 32, 64, 24, 2
    per_block = (2 * 2 * C  # two LayerNorms (weight + bias)
                 + C * 3 * C + 3 * C  # qkv
                 + C * C + C  # attention output
                 + C * 4 * C + 4 * C + 4 * C * C + C)  # MLP
    expected = V * C + T * C + L * per_block + 2 * C  # tied head, final norm
    assert GPT(cfg).num_params() == expected


def test_flops_per_token_follows_6n_plus_attention():
    model = GPT(tiny())
    n = model.num_params(exclude_embeddings=True)
    assert model.flops_per_token() == 6 * n + 12 * 2 * 32 * 24
    # Untied, by hand: the input table is a lookup; the output layer (64 padded rows) a matmul.
    C, L, H, kv_width = 32, 2, 128, 2 * 2 * 8  # swiglu hidden 8/3*32 rounded up to 64 -> 128
    per_block = 2 * C + 2 * 8 + C * (C + kv_width) + C * C + C * 2 * H + H * C  # qk_norm, no bias
    matmul_params = L * per_block + C + 64 * C  # blocks, final norm, lm_head
    assert GPT(tiny(**LLAMA)).flops_per_token(seq_len=10) == 6 * matmul_params + 12 * L * C * 10


def test_frozen_weights_skip_their_weight_gradient_flops():
    """A frozen weight costs 2 (forward) + 2 (activation gradient) FLOPs, not 6; the forward
    pass alone is a third of the all-trainable figure."""
    model = GPT(tiny())
    full = model.flops_per_token()
    assert 3 * model.forward_flops_per_token() == full
    block = model.blocks[0]
    frozen = sum(p.numel() for p in block.parameters())
    block.requires_grad_(False)
    assert model.flops_per_token() == full - 2 * frozen
    model.pos_emb.requires_grad_(False)  # a lookup: no FLOPs either way
    assert model.flops_per_token() == full - 2 * frozen


def test_residual_projections_use_scaled_init():
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=8, n_embd=256, n_head=4))
    std = model.blocks[0].attn.proj.weight.std().item()
    assert math.isclose(std, 0.02 / math.sqrt(16), rel_tol=0.1)


def test_padded_vocab_and_invalid_configs():
    assert tiny(vocab_size=65).padded_vocab_size == 128
    with pytest.raises(ValueError, match="multiple of model.n_head"):
        tiny(n_embd=30)
    with pytest.raises(ValueError, match="n_kv_head"):
        tiny(n_kv_head=3)


def test_longer_than_block_size_is_refused():
    model = GPT(tiny())
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 25, dtype=torch.long))
