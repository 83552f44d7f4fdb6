"""The SFT (masked LM) and DPO objectives on tiny models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gptforge.data.finetune_loader import PreferenceLoader, SFTLoader
from gptforge.model import GPT, ModelConfig
from gptforge.model.loss import IGNORE_INDEX
from gptforge.train.objectives import DirectPreference, MaskedLanguageModeling

PAD = 1
VOCAB = 40


def tiny_model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=16, block_size=16, **kw))


def random_examples(n: int, seed: int = 0) -> list[tuple[list[int], list[bool]]]:
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(5, 14, (1,), generator=g))
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        ids = torch.randint(2, VOCAB, (length,), generator=g).tolist()
        examples.append((ids, [i >= prompt for i in range(length)]))
    return examples


class LogitSpy(nn.Module):
    """Runs a model and keeps its logits, with their gradient after backward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, **kwargs):
        self.logits = self.model(x, **kwargs)
        self.logits.retain_grad()
        return self.logits


@pytest.mark.parametrize("packing", [False, True])
def test_sft_loss_counts_only_assistant_targets_and_prompt_gets_no_gradient(packing):
    loader = SFTLoader(random_examples(12), block_size=16, batch_size=4, seed=0, pad_id=PAD,
                       packing=packing)
    batch = loader.next_batch()
    y = batch[1]
    spy = LogitSpy(tiny_model())
    loss, n_tokens = MaskedLanguageModeling()(spy, batch)
    counted = y != IGNORE_INDEX
    assert n_tokens == int(counted.sum()) > 0
    logits = spy.logits.detach()
    expected = F.cross_entropy(logits[counted].float(), y[counted])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    grad = spy.logits.grad  # (B, T, V)
    assert (grad[~counted] == 0).all()  # prompt and padding targets: exactly no gradient
    assert (grad[counted].abs().sum(dim=-1) > 0).all()


def test_sft_packed_and_padded_batches_give_the_same_token_losses():
    examples = random_examples(6, seed=3)
    model = tiny_model().eval()
    total = {}
    for packing in (False, True):
        loader = SFTLoader(examples, block_size=16, batch_size=6, seed=0, pad_id=PAD,
                           packing=packing)
        rows = loader.windows_per_epoch
        loader = SFTLoader(examples, block_size=16, batch_size=rows, seed=0, pad_id=PAD,
                           packing=packing)
        with torch.no_grad():
            loss, n = MaskedLanguageModeling()(model, loader.next_batch())
        total[packing] = (float(loss) * n, n)
    assert total[False][1] == total[True][1]
    assert math.isclose(total[False][0], total[True][0], rel_tol=1e-5)


def test_sft_batch_with_nothing_to_learn_is_zero_not_nan():
    model = tiny_model()
    x = torch.randint(2, VOCAB, (2, 8))
    loss, n = MaskedLanguageModeling()(model, (x, torch.full_like(x, IGNORE_INDEX)))
    assert n == 0 and float(loss.detach()) == 0.0


def test_sft_on_moe_model_reports_the_plain_loss():
    model = tiny_model(n_experts=4, moe_top_k=2)
    x = torch.randint(2, VOCAB, (2, 8))
    y = torch.where(torch.rand(2, 8) < 0.5, torch.randint(2, VOCAB, (2, 8)), IGNORE_INDEX)
    loss, _ = MaskedLanguageModeling()(model, (x, y))
    with torch.no_grad():
        plain = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
        model.aux_loss()  # clear the MoE losses of this extra forward
    torch.testing.assert_close(loss.detach(), plain)
    loss.backward()  # the router gets its load-balancing gradient as well
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0


def preference_batch(n_pairs: int = 6, seed: int = 0):
    chosen, rejected = random_examples(n_pairs, seed), random_examples(n_pairs, seed + 100)
    pairs = [(*c, *r) for c, r in zip(chosen, rejected)]
    loader = PreferenceLoader(pairs, block_size=16, batch_size=n_pairs, seed=0, pad_id=PAD)
    return loader.next_batch()


@pytest.mark.parametrize("arch", [{}, dict(n_experts=4, moe_top_k=2)], ids=["dense", "moe"])
def test_dpo_loss_is_ln2_when_the_policy_is_the_reference(arch):
    reference = tiny_model(**arch)
    policy = copy.deepcopy(reference).train()
    objective = DirectPreference(reference, beta=0.1)
    batch = preference_batch()
    loss, n_tokens = objective(policy, batch)
    torch.testing.assert_close(loss, torch.tensor(math.log(2)))
    m = objective.metrics
    assert m["reward_margin"] == 0 and m["chosen_reward"] == 0 and m["rejected_reward"] == 0
    assert m["reward_accuracy"] == 0  # no pair is preferred yet
    assert n_tokens == int((batch[1] != IGNORE_INDEX).sum() + (batch[3] != IGNORE_INDEX).sum())
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())


def test_dpo_sft_weight_adds_the_chosen_per_token_nll():
    reference = tiny_model()
    policy = copy.deepcopy(reference)
    batch = preference_batch()
    dpo, _ = DirectPreference(reference, sft_weight=0.0)(policy, batch)
    both, _ = DirectPreference(reference, sft_weight=0.5)(policy, batch)
    cx, cy = batch[0], batch[1]
    with torch.no_grad():
        nll = F.cross_entropy(policy(cx).flatten(0, 1), cy.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(both.detach(), dpo.detach() + 0.5 * nll)


def test_dpo_steps_prefer_the_chosen_answers():
    reference = tiny_model()
    policy = copy.deepcopy(reference).train()
    objective = DirectPreference(reference, beta=0.5)
    batch = preference_batch()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    for _ in range(8):
        loss, _ = objective(policy, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    loss, _ = objective(policy, batch)
    assert float(loss.detach()) < math.log(2) - 0.05
    m = objective.metrics
    assert m["reward_margin"] > 0 and m["reward_accuracy"] > 0.5
    assert m["chosen_reward"] > m["rejected_reward"]
    assert all(p.grad is None for p in reference.parameters())  # the reference never moved
