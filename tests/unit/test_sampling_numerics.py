"""Sampling at the far ends of its documented ranges: every setting gives a valid token.

Facts checked: a temperature that tends to 0 tends to greedy decoding (the argmax), so tiny
temperatures must pick exactly what temperature 0 picks; a huge temperature flattens the
distribution but never makes a banned (-inf) token possible; a repetition penalty scales the
seen logits without ever producing NaN or +inf. Without the numerics of ``sampling.py`` these
cases overflow float32 into inf - inf = NaN, and ``torch.multinomial`` raises.
"""

import math

import pytest
import torch

from gptforge.errors import GptforgeError
from gptforge.inference.engine import Engine
from gptforge.inference.sampling import SamplingSettings, apply_repetition_penalty, sample_next
from gptforge.model import GPT, ModelConfig

TINY_TEMPERATURES = [1e-10, 1e-30, 1e-40, 1e-300, 5e-324]  # the last: the smallest double
HUGE = 10**400  # a 401-digit integer, as JSON may carry: too large for any float


def short_id(value):
    """Test ids that do not print 401 digits."""
    return "10**400" if value == HUGE else "-10**400" if value == -HUGE else None


def random_logits(rows: int = 8, vocab: int = 50, scale: float = 5.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(rows, vocab, generator=gen) * scale  # ties have probability 0


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
def test_a_tiny_temperature_is_greedy(temperature):
    logits = random_logits()
    greedy = logits.argmax(dim=-1)
    gen = torch.Generator().manual_seed(1)
    for top_k, top_p in [(0, 1.0), (5, 0.9), (0, 0.0)]:
        picked = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                             generator=gen)
        assert picked.tolist() == greedy.tolist()
    # Logits within 1e-6 of each other: at T = 1e-40 the gap is still 1e34 in units of T.
    close = torch.tensor([[0.0, 1e-6, -1e-6]])
    assert sample_next(close, temperature=temperature, generator=gen).item() == 1


@pytest.mark.parametrize("temperature", [1e30, 1e300, HUGE], ids=short_id)
def test_a_huge_temperature_is_uniform_over_allowed_tokens(temperature):
    logits = random_logits(rows=1, vocab=4)
    logits[0, 2] = float("-inf")  # banned, as chat markers are
    gen = torch.Generator().manual_seed(2)
    draws = torch.cat([sample_next(logits, temperature=temperature, generator=gen)
                       for _ in range(600)])
    counts = torch.bincount(draws, minlength=4).tolist()
    assert counts[2] == 0 and all(150 < c < 250 for i, c in enumerate(counts) if i != 2)


@pytest.mark.parametrize("penalty", [1e-300, 1e-40, 1e40, 1e300, HUGE], ids=short_id)
def test_extreme_repetition_penalties_stay_finite(penalty):
    logits = torch.tensor([[3.0, 0.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[0, 1, 2]])  # a positive, a zero and a negative logit
    out = apply_repetition_penalty(logits, seen, penalty)
    assert not out.isnan().any() and not (out == float("inf")).any()
    assert out[0, 3:].tolist() == [1.0, 0.5]  # unseen tokens untouched
    assert out[0, 1].item() == 0.0  # 0 stays 0 (not 0 * inf = NaN)
    # A tiny penalty makes the seen positive logit the most likely by far, a huge one the least.
    gen = torch.Generator().manual_seed(3)
    for temperature in (0, 1e-40):
        assert sample_next(out, temperature=temperature, generator=gen).item() == \
            (0 if penalty < 1 else 3)
    assert 0 <= sample_next(out, generator=gen).item() < 5


def test_the_engine_at_a_tiny_temperature_decodes_greedily():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, n_layer=2, n_head=2, n_embd=32, block_size=32,
                            init_std=0.3)).eval()
    engine = Engine(model)

    def run(**settings) -> list[int]:
        steps = engine.generate([1, 2, 3], SamplingSettings(max_new_tokens=12, seed=0,
                                                            **settings))
        return [int(step) for step in steps]

    greedy = run(temperature=0)
    assert len(set(greedy)) > 2  # a varied continuation: a real comparison
    for temperature in (1e-40, 1e-300):
        assert run(temperature=temperature) == greedy
        assert len(run(temperature=temperature, repetition_penalty=1e-300)) == 12


@pytest.mark.parametrize("field, value, words", [
    ("temperature", float("nan"), "finite number, got nan"),
    ("temperature", float("inf"), "finite number, got inf"),
    ("temperature", HUGE, "finite number, got 1000"),
    ("temperature", -0.5, ">= 0"),
    ("top_p", float("nan"), "finite number"),
    ("repetition_penalty", float("inf"), "finite number"),
    ("repetition_penalty", -HUGE, "finite number"),
    ("repetition_penalty", 0.0, "> 0"),
], ids=lambda v: short_id(v) if isinstance(v, int) else None)
def test_settings_refuse_what_no_sampling_can_mean(field, value, words):
    with pytest.raises(GptforgeError, match=field) as err:
        SamplingSettings(**{field: value})
    assert words in str(err.value) and len(str(err.value)) < 200  # a huge int is cut short
    assert math.isfinite(SamplingSettings(temperature=1e-300,
                                          repetition_penalty=1e-300).temperature)
