import math

import pytest
import torch

from gptforge.inference.kv_cache import KVCache, SlotCache
from gptforge.model import GPT, ModelConfig
from gptforge.model.layers import MLP, apply_rope, rope_tables
from gptforge.model.lora import apply_lora, lora_modules, merge_lora

LLAMA = dict(norm="rmsnorm", pos_emb="rope", mlp="swiglu", n_kv_head=2, qk_norm=True,
             bias=False, tie_embeddings=False)


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=50, n_layer=2, n_head=4, n_embd=32, block_size=24)
    return ModelConfig(**{**base, **kw})


# The later switches, each alone and in combinations (with GQA, RoPE, a head size of its own).
SWITCHES = {
    "gate-head": dict(attn_gate="head"),
    "gate-channel-gqa": dict(attn_gate="channel", n_kv_head=2),
    "sinusoidal": dict(pos_emb="sinusoidal"),
    "geglu": dict(mlp="geglu"),
    "reglu": dict(mlp="reglu", bias=False),
    "head-dim": dict(head_dim=12),
    "head-dim-llama": dict(LLAMA, head_dim=12),
    "all": dict(LLAMA, head_dim=6, attn_gate="channel", mlp="geglu"),
    "all-sinusoidal": dict(pos_emb="sinusoidal", head_dim=10, attn_gate="head", mlp="reglu",
                           n_kv_head=1),
}


@pytest.mark.parametrize("arch", [{}, LLAMA, dict(mlp="relu2", logit_softcap=15.0),
                                  *SWITCHES.values()], ids=["gpt2", "llama", "other", *SWITCHES])
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


@pytest.mark.parametrize("arch", [{}, LLAMA, SWITCHES["all-sinusoidal"]],
                         ids=["gpt2-learned", "llama-rope", "sinusoidal"])
def test_rows_of_different_lengths_decode_as_if_alone(arch):
    """Continuous batching: three rows of a slot cache, prefilled to lengths 3, 9 and 6 (one
    row at a time, then a chunk for two rows at once), decode together with per-row positions;
    every row's logits are those of a full forward of its own sequence."""
    torch.manual_seed(0)
    model = GPT(tiny(**arch)).eval()
    seqs = torch.randint(0, 50, (3, 16))
    lengths = [3, 9, 6]
    cache = SlotCache.for_model(model, slots=4)
    slots = [2, 0, 3]  # not in order, not contiguous: the cache gathers the rows
    for slot, seq, n in zip(slots, seqs, lengths):
        model(seq[None, :n - 2], kv_cache=cache.rows[slot])  # a row alone: a KVCache view
    first = [slots[0], slots[2]]  # two rows of lengths 1 and 4 take a chunk of 2 tokens each
    chunk = torch.stack([seqs[0, 1:3], seqs[2, 4:6]])
    step = cache.step(first, chunk)
    model(chunk, kv_cache=step, positions=step.positions)
    step.advance()
    model(seqs[1:2, 7:9], kv_cache=cache.rows[slots[1]])
    steps = []
    for t in range(5):  # one token per row at once, each at its own position
        idx = torch.stack([seqs[i, lengths[i] + t] for i in range(3)])[:, None]
        step = cache.step(slots, idx)
        steps.append(model(idx, kv_cache=step, positions=step.positions))
        step.advance()
    for i, n in enumerate(lengths):
        full = model(seqs[i:i + 1, :n + 5])[0, n:]  # (5, V)
        torch.testing.assert_close(torch.cat([s[i] for s in steps]), full, atol=1e-5,
                                   rtol=1e-4)
    assert [cache.rows[s].pos for s in slots] == [n + 5 for n in lengths]
    with pytest.raises(ValueError, match="kv_cache"):
        model(seqs[:, :1], positions=torch.zeros(3, 1, dtype=torch.long))


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


@pytest.mark.parametrize("arch", SWITCHES.values(), ids=SWITCHES)
def test_packed_rows_compute_each_example_as_if_alone(arch):
    torch.manual_seed(0)
    model = GPT(tiny(**arch)).eval()
    a, b = torch.randint(0, 50, (1, 9)), torch.randint(0, 50, (1, 6))
    segments = torch.tensor([[0] * 9 + [1] * 6])
    packed = model(torch.cat([a, b], dim=1), segment_ids=segments)
    torch.testing.assert_close(packed, torch.cat([model(a), model(b)], dim=1),
                               atol=1e-5, rtol=1e-4)


def test_attention_gate_scales_each_head_or_channel_by_a_sigmoid():
    """Gate logits of +30 (sigmoid ~ 1) reproduce the ungated model; a head gated to 0 adds
    nothing, as if its columns of the output projection were zero."""
    torch.manual_seed(0)
    plain = GPT(tiny(n_layer=1)).eval()
    idx = torch.randint(0, 50, (2, 10))
    for kind, width in (("head", 4), ("channel", 32)):
        gated = GPT(tiny(n_layer=1, attn_gate=kind)).eval()
        assert gated.blocks[0].attn.gate.weight.shape == (width, 32)
        state = {**plain.state_dict(), "blocks.0.attn.gate.weight": torch.zeros(width, 32),
                 "blocks.0.attn.gate.bias": torch.full((width,), 30.0)}
        gated.load_state_dict(state)
        torch.testing.assert_close(gated(idx), plain(idx), atol=1e-5, rtol=1e-4)
    off = state["blocks.0.attn.gate.bias"].clone()
    off[:8] = -30.0  # the channels of head 0
    gated.load_state_dict({**state, "blocks.0.attn.gate.bias": off})
    cut = plain.state_dict()
    cut["blocks.0.attn.proj.weight"][:, :8] = 0.0
    plain.load_state_dict(cut)
    torch.testing.assert_close(gated(idx), plain(idx), atol=1e-5, rtol=1e-4)


def test_sinusoidal_positions_are_the_papers_fixed_table():
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...); not a parameter, not in
    the state dict, and a token's logits depend on where it stands."""
    model = GPT(tiny(pos_emb="sinusoidal", n_embd=16, n_head=2))
    table = model.pos_table
    for pos, i in ((0, 0), (5, 0), (7, 3), (23, 7)):
        angle = pos / 10000 ** (2 * i / 16)
        assert math.isclose(table[pos, 2 * i], math.sin(angle), abs_tol=1e-6)
        assert math.isclose(table[pos, 2 * i + 1], math.cos(angle), abs_tol=1e-6)
    assert "pos_table" not in model.state_dict()
    assert all("pos" not in name for name, _ in model.named_parameters())
    logits = model(torch.full((1, 4), 7)).detach()
    assert not torch.allclose(logits[0, 0], logits[0, 3])


def gelu_tanh(g: torch.Tensor) -> torch.Tensor:
    return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))


@pytest.mark.parametrize("kind, act", [
    ("geglu", gelu_tanh),
    ("reglu", lambda g: g.clamp(min=0)),
    ("swiglu", lambda g: g * torch.sigmoid(g)),
])
def test_gated_mlps_compute_act_of_gate_times_value(kind, act):
    """GLU variants (Shazeer, 2020): down(act(x W_gate) * (x W_value)); the gate rows come first."""
    torch.manual_seed(0)
    mlp = MLP(tiny(mlp=kind, bias=False))
    assert mlp.up.weight.shape == (2 * 128, 32)  # 8/3 * 32 rounded up to 64, twice
    x = torch.randn(3, 32)
    w_gate, w_value = mlp.up.weight[:128], mlp.up.weight[128:]
    expected = (act(x @ w_gate.T) * (x @ w_value.T)) @ mlp.down.weight.T
    torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=1e-4)


def test_head_dim_apart_from_n_embd_over_n_head():
    """16 heads of 8 in a 96-wide model (n_embd / n_head would be 6): attention works in 128
    channels; the FLOPs count the wider projections and attention products."""
    cfg = tiny(n_embd=96, n_head=16, n_kv_head=4, head_dim=8, bias=False, attn_gate="head")
    assert (cfg.head_size, cfg.attn_width) == (8, 128)
    model = GPT(cfg)
    attn = model.blocks[0].attn
    assert attn.qkv.weight.shape == ((16 + 2 * 4) * 8, 96)
    assert attn.proj.weight.shape == (96, 128)
    C, L = 96, 2
    per_block = 2 * C + C * 24 * 8 + 128 * C + 16 * C + 2 * 4 * C * C  # norms qkv proj gate mlp
    matmul_params = L * per_block + C + 64 * C  # blocks, final norm, tied output layer
    assert model.flops_per_token(seq_len=10) == 6 * matmul_params + 12 * L * 128 * 10
    assert tiny(n_embd=30, n_head=4, head_dim=8).head_size == 8  # no divisibility needed


def test_old_model_json_without_the_new_fields_loads_as_before():
    old = {k: v for k, v in tiny(**LLAMA).to_dict().items()
           if k not in ("head_dim", "attn_gate")}
    cfg = ModelConfig.from_dict(old)
    assert (cfg.head_size, cfg.attn_gate, cfg.pos_emb) == (8, "none", "rope")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("settings, message", [
    (dict(attn_gate="elementwise"), "model.attn_gate must be one of none, head, channel"),
    (dict(mlp="swish"), "model.mlp must be one of gelu, relu2, swiglu, geglu, reglu"),
    (dict(pos_emb="alibi"), "model.pos_emb must be one of learned, rope, sinusoidal"),
    (dict(head_dim=-1), "model.head_dim must be >= 0"),
    (dict(n_embd=30), "or set model.head_dim"),
    (dict(pos_emb="rope", head_dim=7), "even head size, not 7"),
    (dict(pos_emb="sinusoidal", n_embd=33, n_head=3), "sinusoidal needs an even model.n_embd"),
])
def test_invalid_switches_are_refused_with_the_setting_named(settings, message):
    with pytest.raises(ValueError, match=message):
        tiny(**settings)


@pytest.mark.parametrize("arch", [SWITCHES[k] for k in ("gate-head", "sinusoidal", "geglu",
                                                         "head-dim-llama", "all")],
                         ids=["gate", "sinusoidal", "geglu", "head-dim", "all"])
def test_a_tiny_model_with_each_switch_learns(arch):
    """Twenty Adam steps on one batch lower the loss by more than half (gradients reach every
    new weight: the gate's too)."""
    torch.manual_seed(0)
    model = GPT(tiny(**arch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 50, (4, 17))
    losses = []
    for _ in range(20):
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        if "attn_gate" in arch:
            assert model.blocks[0].attn.gate.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_lora_can_target_the_attention_gate():
    torch.manual_seed(0)
    model = GPT(tiny(**SWITCHES["all"])).eval()
    assert apply_lora(model, rank=2, alpha=4, dropout=0.0, targets=["gate"]) == \
        ["blocks.0.attn.gate", "blocks.1.attn.gate"]
    for _, layer in lora_modules(model):
        torch.nn.init.normal_(layer.lora_b)  # an adapter that changes the output
    assert_cached_decoding_matches_full_forward(model)
    idx = torch.randint(0, 50, (1, 8))
    adapted = model(idx)
    merge_lora(model)
    torch.testing.assert_close(model(idx), adapted, atol=1e-5, rtol=1e-4)
