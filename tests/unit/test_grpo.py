"""GRPO's pieces against hand computations: group advantages, the clipped objective, the k3 KL,
the objective's gradient, the rewards, and the rollout loader's batches and state."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from gptforge.config.schema import RlConfig
from gptforge.errors import GptforgeError
from gptforge.model.config import ModelConfig
from gptforge.model.gpt import GPT
from gptforge.model.loss import IGNORE_INDEX, target_log_probs
from gptforge.tokenizer.char import CharTokenizer
from gptforge.train.objectives import (
    GroupRelativePolicy,
    clipped_policy_loss,
    group_advantages,
    k3_kl,
)
from gptforge.train.rewards import build_reward, exact_answer, score
from gptforge.train.rollouts import Prompt, RolloutLoader, RolloutSettings


def test_group_advantages_by_hand():
    # Group 1: mean 0.25, sample std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5. Group 2: all alike.
    adv = group_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1]), group_size=4, eps=0.0)
    assert adv[:4].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5])
    torch.testing.assert_close(group_advantages(torch.ones(4), 4), torch.zeros(4))
    # eps is added to the standard deviation: 0.75 / (0.5 + 0.5)
    assert float(group_advantages(torch.tensor([1.0, 0, 0, 0]), 4, eps=0.5)[0]) == 0.75


def test_clipped_objective_by_hand():
    ratios = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.1])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0])
    loss = clipped_policy_loss(ratios.log(), torch.zeros(5), adv, clip_eps=0.2)
    # -min(r A, clip(r) A): 1.2 caps the gain; 0.5 < 0.8 is kept; -1.5 < -1.2 kept; -0.8; 2.2
    assert loss.tolist() == pytest.approx([-1.2, -0.5, 1.5, 0.8, -2.2])


def test_k3_kl_by_hand():
    ref, new = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert float(k3_kl(ref, new)) == pytest.approx(2 - math.log(2) - 1)
    assert float(k3_kl(new, new)) == 0.0
    assert bool((k3_kl(torch.randn(100), torch.randn(100)) >= 0).all())


def tiny_model(seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=12,
                           dropout=0.0))


def rollout_batch(model, advantages):
    """Two rows with answers on the last 3 and 2 positions; old_logp = the model's."""
    x = torch.randint(0, 12, (2, 6), generator=torch.Generator().manual_seed(1))
    y = torch.full((2, 6), IGNORE_INDEX)
    y[0, 3:], y[1, 4:] = torch.tensor([1, 2, 3]), torch.tensor([4, 5])
    with torch.no_grad():
        old = target_log_probs(model(x), y)
    return x, y, torch.tensor(advantages), old, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])


def test_first_pass_gradient_is_the_policy_gradient():
    """At ratio 1 the loss is -mean(A) over answer tokens and its gradient that of
    -sum(A * logp) / n_tokens (computed here by hand with autograd)."""
    model = tiny_model()
    batch = rollout_batch(model, [1.0, -2.0])
    objective = GroupRelativePolicy(clip_eps=0.2)
    loss, n = objective(model, batch)
    assert n == 5 and objective.loss_terms(batch) == 5
    assert float(loss.detach()) == pytest.approx(-(3 * 1.0 + 2 * -2.0) / 5)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    x, y, adv = batch[:3]
    by_hand = -(target_log_probs(model(x), y) * adv[:, None]).sum() / 5
    by_hand.backward()
    for got, want in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want)
    assert objective.metrics["failed_rollouts"] == 1.0
    assert objective.metrics["reward_mean"] == 0.5
    assert objective.metrics["completion_len"] == 2.5


def test_kl_to_reference_is_zero_at_start_and_positive_after_a_change():
    model = tiny_model()
    objective = GroupRelativePolicy(copy.deepcopy(model), clip_eps=0.2, kl_coef=0.1)
    batch = rollout_batch(model, [1.0, -1.0])
    objective(model, batch)
    assert objective.metrics["kl"] == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        model.lm_head.weight.add_(0.5 * torch.randn_like(model.lm_head.weight))
    loss, _ = objective(model, batch)
    assert objective.metrics["kl"] > 0 and torch.isfinite(loss)
    with pytest.raises(ValueError):
        GroupRelativePolicy(None, kl_coef=0.1)  # a KL needs a reference


# ---- rewards ---------------------------------------------------------------------------------

def test_exact_reward_extracts_numbers_and_text():
    assert exact_answer("", "19", {"answer": "19"}) == 1.0
    assert exact_answer("", "so #### 1,019", {"answer": 1019}) == 1.0
    assert exact_answer("", "it is 18 or 19", {"answer": "19"}) == 1.0  # the last number
    assert exact_answer("", "191", {"answer": "19"}) == 0.0
    assert exact_answer("", " Paris.", {"answer": "paris"}) == 1.0
    assert exact_answer("", "", {"answer": "19"}) == 0.0
    assert exact_answer("", "le chat", {"answer": ["chat", "le chat"]}) == 1.0


def test_format_reward_and_bad_specs(tmp_path):
    fmt = build_reward(RlConfig(reward="format", format_pattern=r"^<a>.*</a>$"))
    assert fmt("p", "<a>x</a>", {}) == 1.0 and fmt("p", "x<a></a>", {}) == 0.0
    (tmp_path / "mine.py").write_text("def r(prompt, completion, example):\n    return 2.5\n")
    assert build_reward(RlConfig(reward=f"{tmp_path / 'mine.py'}:r"))("p", "c", {}) == 2.5
    bad = [("format", "", "needs a pattern"), ("format", "(", "not a valid regular expression"),
           ("nonsense", "", "expected exact, format"),
           ("no_such_module_xyz:f", "", "cannot import module"),
           (f"{tmp_path / 'mine.py'}:missing", "", "has no function 'missing'"),
           (f"{tmp_path / 'nope.py'}:r", "", "no such file")]
    for reward, pattern, message in bad:
        with pytest.raises(GptforgeError, match=message) as err:
            build_reward(RlConfig(reward=reward, format_pattern=pattern))
        assert "\n" not in str(err.value)


def test_a_failing_reward_scores_zero_and_says_why():
    def raises(prompt, completion, example):
        raise KeyError("label")

    assert score(raises, "p", "c", {}) == (0.0, "KeyError: 'label'")
    assert score(lambda *a: float("nan"), "p", "c", {})[0] == 0.0
    assert score(lambda *a: "yes", "p", "c", {})[1].startswith("returned 'yes'")
    assert score(lambda *a: True, "p", "c", {}) == (1.0, None)


# ---- the rollout loader -------------------------------------------------------------------------

def loader(model, ppo_epochs=1, reward=lambda p, c, e: float(c.startswith("a"))):
    tok = CharTokenizer.train(["abcdefg"])
    prompts = [Prompt(tok.encode(t), t, {}) for t in ("ab", "cde", "f")]
    settings = RolloutSettings(group_size=4, max_new_tokens=5, ppo_epochs=ppo_epochs,
                               stop_ids=(tok.eos_id,))
    return RolloutLoader(model, tok, prompts, reward, settings, batch_size=2, seed=3)


def test_rollout_batches_hold_the_answers_and_their_log_probs():
    model = tiny_model().train()
    data = loader(model)
    x, y, adv, old, rewards, failed = data.next_batch()
    assert model.training  # sampling left the model in training mode
    assert x.shape == y.shape == old.shape and x.size(0) == 8 and adv.shape == (8,)
    counted = y != IGNORE_INDEX
    assert bool(((counted.sum(1) >= 1) & (counted.sum(1) <= 5)).all())
    # Within an answer the targets are the inputs shifted by one.
    inside = counted[:, :-1] & counted[:, 1:]
    assert inside.any() and bool((y[:, :-1][inside] == x[:, 1:][inside]).all())
    torch.testing.assert_close(old, target_log_probs(model.eval()(x), y))
    assert bool((old[~counted] == 0).all())
    torch.testing.assert_close(adv, group_advantages(rewards, 4))
    assert failed.sum() == 0


def test_rollouts_resume_exactly_and_are_served_ppo_epochs_times():
    model = tiny_model()
    a = loader(model, ppo_epochs=2)
    first = a.next_batch()
    state = copy.deepcopy(a.state_dict())
    assert len(state["round"]) == 1  # half-served: the rollouts themselves are saved
    second = a.next_batch()
    for t, u in zip(first, second):  # the same rollouts, a second pass
        torch.testing.assert_close(t, u)
    third, fourth = a.next_batch(), a.next_batch()
    b = loader(model, ppo_epochs=2)
    b.load_state_dict(state)
    for batch in (second, third, fourth):
        for t, u in zip(batch, b.next_batch()):
            torch.testing.assert_close(t, u)


def test_failed_rewards_are_counted_and_sampling_goes_on():
    def flaky(prompt, completion, example):
        if "b" in completion:
            raise ValueError("no b please")
        return 1.0

    data = loader(tiny_model(), reward=flaky)
    batches = [data.next_batch() for _ in range(3)]
    failed = sum(int(b[5].sum()) for b in batches)
    assert failed == data.failures > 0
    for b in batches:
        assert bool((b[4][b[5] == 1] == 0).all())  # a failed rollout scores 0
