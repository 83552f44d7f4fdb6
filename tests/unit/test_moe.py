import pytest
import torch

from gptforge.model import GPT, ModelConfig
from gptforge.model.layers import MLP
from gptforge.model.loss import token_cross_entropy
from gptforge.model.moe import MoEMLP, load_balancing_loss, route
from gptforge.runtime.activation_checkpointing import apply_activation_checkpointing
from gptforge.train.objectives import LanguageModeling, unwrap_model
from tests.unit.test_model import assert_cached_decoding_matches_full_forward

LLAMA = dict(norm="rmsnorm", pos_emb="rope", mlp="swiglu", n_kv_head=2, bias=False,
             tie_embeddings=False)


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=50, n_layer=2, n_head=4, n_embd=32, block_size=24, n_experts=4,
                moe_top_k=2)
    return ModelConfig(**{**base, **kw})


def test_output_shape_and_stored_losses():
    torch.manual_seed(0)
    moe = MoEMLP(tiny())
    y = moe(torch.randn(3, 5, 32))
    assert y.shape == (3, 5, 32)
    assert moe.balance_loss.shape == () and moe.z_loss.shape == ()


def test_single_expert_equals_the_dense_mlp():
    torch.manual_seed(0)
    cfg = tiny(n_experts=1, moe_top_k=1)
    dense, moe = MLP(cfg), MoEMLP(cfg)
    moe.experts[0].load_state_dict(dense.state_dict())
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(moe(x), dense(x))


@pytest.mark.parametrize("mlp,top_k", [("gelu", 2), ("swiglu", 3), ("relu2", 1)])
def test_each_token_gets_the_weighted_sum_of_its_top_k_experts(mlp, top_k):
    torch.manual_seed(0)
    moe = MoEMLP(tiny(mlp=mlp, moe_top_k=top_k, moe_expert_hidden=16))
    x = torch.randn(2, 6, 32)
    expected = torch.zeros_like(x)
    for b in range(2):  # the naive reference: token by token
        for t in range(6):
            probs = moe.router(x[b, t]).softmax(-1)
            top, chosen = probs.topk(top_k)
            if top_k > 1:
                top = top / top.sum()
            for w, e in zip(top, chosen.tolist()):
                expected[b, t] += w * moe.experts[e](x[b, t])
    torch.testing.assert_close(moe(x), expected, atol=1e-6, rtol=1e-5)


def test_route_renormalises_top_k_but_keeps_the_single_probability():
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    weights, experts = route(probs, 2)
    torch.testing.assert_close(weights, torch.tensor([[0.625, 0.375]]))
    assert experts.tolist() == [[0, 1]]
    weights, _ = route(probs, 1)  # Switch: the router still gets the LM loss's gradient
    torch.testing.assert_close(weights, torch.tensor([[0.5]]))


def test_load_balancing_loss_formula():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    counts = torch.tensor([1, 1, 0])  # top-1: token 0 -> expert 0, token 1 -> expert 1
    # f = (1/2, 1/2, 0), P = (0.4, 0.4, 0.2): 3 * (0.2 + 0.2) = 1.2
    torch.testing.assert_close(load_balancing_loss(probs, counts), torch.tensor(1.2))


def test_balance_loss_is_one_when_uniform_and_larger_when_collapsed():
    torch.manual_seed(0)
    moe = MoEMLP(tiny())
    x = torch.rand(4, 8, 32)  # positive inputs
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform probabilities: P_i = 1/E, so E * sum f_i / E = 1
    moe(x)
    torch.testing.assert_close(moe.balance_loss, torch.tensor(1.0))
    with torch.no_grad():
        moe.router.weight[0] = 1.0  # expert 0 wins every token with probability ~1
    moe(x)
    assert moe.balance_loss > 1.9  # f_0 = 1/2 (one of two slots), P_0 ~ 1: 4 * 1/2 = 2


def test_moe_every_places_moe_blocks():
    model = GPT(tiny(n_layer=4, moe_every=2))
    kinds = [type(block.mlp) for block in model.blocks]
    assert kinds == [MLP, MoEMLP, MLP, MoEMLP]
    assert all(type(block.mlp) is MLP for block in GPT(tiny(n_experts=0)).blocks)


def test_invalid_moe_configs():
    with pytest.raises(ValueError, match="moe_top_k"):
        tiny(moe_top_k=5)
    with pytest.raises(ValueError, match="moe_top_k"):
        tiny(moe_top_k=0)
    with pytest.raises(ValueError, match="moe_every"):
        tiny(moe_every=0)
    tiny(n_experts=0, moe_top_k=5)  # ignored for a dense model


def test_active_parameters_and_flops_match_hand_computation():
    cfg = tiny(vocab_size=64, bias=True, n_experts=4, moe_top_k=2, moe_expert_hidden=48)
    C, V, T, L, E, k, H = 32, 64, 24, 2, 4, 2, 48
    shared = (2 * 2 * C  # two LayerNorms
              + C * 3 * C + 3 * C + C * C + C  # attention
              + C * E)  # router
    expert = C * H + H + H * C + C
    model = GPT(cfg)
    assert model.num_params() == V * C + T * C + L * (shared + E * expert) + 2 * C
    active = V * C + T * C + L * (shared + k * expert) + 2 * C
    assert model.num_active_params() == active < model.num_params()
    assert model.flops_per_token() == 6 * (active - T * C) + 12 * L * C * T


def test_objective_logs_the_lm_loss_and_backpropagates_the_aux_loss():
    torch.manual_seed(0)
    model = GPT(tiny(moe_aux_loss_coef=1.0, moe_z_loss_coef=0.1))
    x = torch.randint(0, 50, (2, 24))
    loss, n_tokens = LanguageModeling()(model, (x, x))
    assert n_tokens == 48
    lm_only = token_cross_entropy(model(x), x)
    aux = model.aux_loss()
    assert loss.item() == lm_only.item()
    (lm_only + aux).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss.backward()
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g)


def test_aux_loss_is_handed_over_once_and_survives_activation_checkpointing():
    torch.manual_seed(0)
    model = GPT(tiny())
    x = torch.randint(0, 50, (2, 24))
    model(x)
    assert model.aux_loss() is not None
    with pytest.raises(RuntimeError, match="forward pass first"):
        model.aux_loss()
    assert GPT(tiny(n_experts=0)).aux_loss() is None
    apply_activation_checkpointing(model)
    model(x)
    model.aux_loss().backward()  # recomputed blocks still connect the stored losses
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0


def test_unwrap_model_reaches_the_gpt_inside_compile():
    model = GPT(tiny())
    assert unwrap_model(torch.compile(model)) is model
    assert unwrap_model(model) is model


def test_tiny_moe_gpt_learns_a_repeating_sequence():
    torch.manual_seed(0)
    model = GPT(tiny())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stream = torch.arange(200) * 7 % 13  # period 13
    objective = LanguageModeling()
    losses = []
    for _ in range(60):
        starts = torch.randint(0, 200 - 25, (8,))
        chunk = torch.stack([stream[s:s + 25] for s in starts.tolist()])
        loss, _ = objective(model, (chunk[:, :-1], chunk[:, 1:]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.1 * losses[0], losses


@pytest.mark.parametrize("arch", [{}, dict(LLAMA, moe_every=2, moe_top_k=1)])
def test_kv_cache_decoding_matches_full_forward(arch):
    torch.manual_seed(0)
    assert_cached_decoding_matches_full_forward(GPT(tiny(**arch)).eval())
