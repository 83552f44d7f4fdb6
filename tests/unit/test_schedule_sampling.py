import itertools
import math

import pytest
import torch

from gptforge.config.schema import ScheduleConfig
from gptforge.inference.sampling import (
    apply_repetition_penalty,
    filter_top_k,
    filter_top_p,
    sample_next,
)
from gptforge.train.schedule import lr_at


@pytest.mark.parametrize("name", ["cosine", "wsd", "linear", "constant"])
def test_schedules_warm_up_then_reach_their_floor(name):
    cfg = ScheduleConfig(name=name, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.4)
    lrs = [lr_at(s, 1.0, 100, cfg) for s in range(101)]
    assert lrs[0] < lrs[5] < lrs[9] <= 1.0  # linear warm-up
    assert max(lrs) == pytest.approx(1.0)
    final = 1.0 if name == "constant" else 0.1
    assert lrs[100] == pytest.approx(final)
    assert all(b <= a + 1e-12 for a, b in zip(lrs[10:], lrs[11:]))  # never rises after warm-up


def test_wsd_is_flat_until_the_decay_window():
    cfg = ScheduleConfig(name="wsd", warmup_steps=10, decay_fraction=0.4)
    assert lr_at(59, 1.0, 100, cfg) == 1.0
    assert lr_at(61, 1.0, 100, cfg) < 1.0


def test_cosine_midpoint():
    cfg = ScheduleConfig(name="cosine", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(50, 1.0, 100, cfg) == pytest.approx(0.5)


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_top_k(logits, 2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_top_p(logits, 0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_top_p(logits, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_top_p(logits, 0.1)).tolist() == [[True, False, False, False]]


def test_top_p_keeps_the_smallest_set_reaching_p_and_never_nothing():
    torch.manual_seed(0)
    logits = torch.randn(8, 20) * 3
    for p in (0.0, 0.3, 0.9, 0.999):
        kept = torch.isfinite(filter_top_p(logits, p))
        for row, mask in zip(logits, kept):
            probs = row.softmax(-1).tolist()
            expected, mass = set(), 0.0
            for i in sorted(range(20), key=lambda i: -probs[i]):  # most likely first
                expected.add(i)
                mass += probs[i]
                if mass >= p:
                    break
            assert set(mask.nonzero().flatten().tolist()) == expected
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, top_p=0.0, generator=g).tolist() == logits.argmax(-1).tolist()


def test_sampling_distribution_and_greedy():
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(probs.log(), generator=g) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=3).float() / 4000
    torch.testing.assert_close(freq, probs[0], atol=0.03, rtol=0)
    assert sample_next(probs.log(), temperature=0).item() == 0


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 1.0]]
    assert math.isclose(apply_repetition_penalty(logits, torch.tensor([[0]]), 1.0)[0, 0], 2.0)


def test_weight_decay_schedules():
    from gptforge.train.schedule import weight_decay_factor

    cfg = ScheduleConfig(weight_decay="linear")
    assert [weight_decay_factor(s, 100, 1.0, cfg) for s in (0, 50, 100)] == [1.0, 0.5, 0.0]
    assert weight_decay_factor(10, 100, 0.3, ScheduleConfig(weight_decay="follow_lr")) == 0.3
    assert weight_decay_factor(10, 100, 0.3, ScheduleConfig()) == 1.0


def test_batch_size_ramp_grows_grad_accum_to_full():
    from gptforge.train.schedule import grad_accum_at

    cfg = ScheduleConfig(batch_ramp_steps=100, batch_ramp_start=0.25)
    accums = [grad_accum_at(s, 8, cfg) for s in range(120)]
    assert accums[0] == 2 and accums[99] <= 8 and accums[100:] == [8] * 20
    assert all(b >= a for a, b in itertools.pairwise(accums))
    assert grad_accum_at(0, 8, ScheduleConfig()) == 8
