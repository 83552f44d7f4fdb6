"""The generation engine: the compiled decode step must agree with the model token for token.

Most tests run the step *uncompiled* (``compiled_step`` patched to the plain function), which
checks the engine logic and the step's math in well under a second; one test compiles for real.
"""

import logging

import pytest
import torch

from gptforge.errors import GptforgeError
from gptforge.inference import decode, engine
from gptforge.inference.decode import CompiledDecoder, StepShape, decode_step, pack
from gptforge.inference.engine import Engine
from gptforge.inference.kv_cache import KVCache
from gptforge.inference.sampling import SamplingSettings, sample_next
from gptforge.model import GPT, ModelConfig

GPT2 = dict(n_kv_head=0)
LLAMA = dict(norm="rmsnorm", pos_emb="rope", mlp="swiglu", n_kv_head=2, bias=False,
             tie_embeddings=False)
OTHER = dict(qk_norm=True, mlp="relu2", logit_softcap=15.0, n_kv_head=1)
# The later switches (docs/architecture.md), two per model to keep the test short.
GATED_HEAD_DIM = dict(LLAMA, attn_gate="channel", head_dim=12, mlp="geglu")
SINUSOIDAL = dict(pos_emb="sinusoidal", attn_gate="head", mlp="reglu", n_kv_head=2)
GREEDY = SamplingSettings(max_new_tokens=40, temperature=0)


def tiny(block_size=24, **arch) -> GPT:
    torch.manual_seed(0)
    # A large init spread gives random models varied (not constant) greedy continuations.
    cfg = ModelConfig(vocab_size=50, n_layer=2, n_head=4, n_embd=32, block_size=block_size,
                      init_std=0.3, **arch)
    return GPT(cfg).eval()


@pytest.fixture
def eager_step(monkeypatch):
    """Run the compiled path's step function without compiling it."""
    monkeypatch.setattr(decode, "compiled_step", lambda: decode_step)


def run(eng: Engine, prompt=(1, 2, 3), settings=GREEDY, **kw) -> list[list[int]]:
    return [step.tolist() for step in eng.generate(list(prompt), settings, **kw)]


@pytest.mark.parametrize("arch", [GPT2, LLAMA, OTHER, GATED_HEAD_DIM, SINUSOIDAL],
                         ids=["gpt2", "llama", "other", "gated-head-dim", "sinusoidal"])
def test_fast_path_matches_uncached_reference(arch, eager_step):
    model = tiny(block_size=64, **arch)
    reference = run(Engine(model), use_cache=False)
    fast = Engine(model, compile=True)
    assert run(fast) == reference
    assert fast.decoder is not None  # the step was really used
    assert len({tuple(r) for r in reference}) > 3  # a varied continuation, not one token


@pytest.mark.parametrize("arch", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_fast_path_slides_its_window_like_the_model_path(arch, eager_step):
    model = tiny(block_size=16, **arch)
    settings = SamplingSettings(max_new_tokens=50, temperature=0)  # 3 + 50 > 3 windows
    assert run(Engine(model, compile=True), settings=settings) == run(Engine(model),
                                                                      settings=settings)


@pytest.mark.parametrize("compile", [False, True], ids=["model", "step"])
def test_each_step_samples_from_a_fresh_forward_of_the_window_it_holds(compile, eager_step,
                                                                        monkeypatch):
    """Batch 3, seeded sampling, past several refills: the logits of every step are those of
    the model run from scratch on the tokens the cache holds (the newest 8 after a refill)."""
    model = tiny(block_size=16, qk_norm=True, **LLAMA)
    seen = []

    def spy(logits, **kwargs):
        seen.append(logits.clone())
        return sample_next(logits, **kwargs)

    monkeypatch.setattr(engine, "sample_next", spy)
    prompt = [1, 2, 3, 4, 5]
    settings = SamplingSettings(max_new_tokens=40, temperature=1.0, seed=3)
    steps = run(Engine(model, compile=compile), prompt, settings, num_samples=3)
    tokens = torch.cat([torch.tensor([prompt] * 3), torch.tensor(steps).T], dim=1)  # (3, 45)
    start = 0
    for i, logits in enumerate(seen):
        n = len(prompt) + i  # tokens known when step i samples
        if n - start > 16:  # the window was full: the cache restarted from the newest 8
            start = n - 8
        with torch.no_grad():
            expected = model(tokens[:, start:n])[:, -1, :50]
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
    assert start > 16  # at least two refills
    assert len({tuple(row) for row in tokens[:, 5:].tolist()}) == 3  # rows sampled apart


def test_stops_when_every_sample_has_produced_a_stop_id(eager_step):
    model = tiny(block_size=64, **LLAMA)
    tokens = [t[0] for t in run(Engine(model))]
    stop = tokens[5]
    out = run(Engine(model, compile=True), stop_ids=[stop])
    assert [t[0] for t in out] == tokens[:tokens.index(stop) + 1]


def test_several_samples_decode_like_one(eager_step):
    model = tiny(block_size=64, **GPT2)
    single = [t[0] for t in run(Engine(model))]
    rows = run(Engine(model, compile=True), num_samples=3)
    assert all(r == [t] * 3 for r, t in zip(rows, single))


def test_sampling_is_reproducible_with_a_seed(eager_step):
    model = tiny(block_size=64, **LLAMA)
    settings = SamplingSettings(max_new_tokens=20, temperature=1.0, top_k=10, seed=7)
    first = run(Engine(model, compile=True), settings=settings, num_samples=2)
    assert first == run(Engine(model, compile=True), settings=settings, num_samples=2)
    assert first == run(Engine(model), settings=settings, num_samples=2)


@pytest.mark.parametrize("arch", [LLAMA, GATED_HEAD_DIM], ids=["llama", "gated-head-dim"])
def test_bf16_weights_stay_close_to_float32(arch):
    model = tiny(block_size=32, **arch)
    s = StepShape.of(model)
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        cache = KVCache.for_model(model, 1, dtype=dtype)
        model(torch.tensor([[1, 2, 3]]), kv_cache=cache)  # prefill through the model
        with torch.inference_mode():
            logits[dtype] = decode_step(s, *pack(model, s, dtype), torch.tensor([[4]]),
                                        torch.tensor([cache.pos]), cache.k, cache.v)
    torch.testing.assert_close(logits[torch.bfloat16], logits[torch.float32], atol=0.1, rtol=0.05)


def test_an_unknown_model_is_refused():
    model = tiny(**GPT2)
    model.extra = torch.nn.Linear(4, 4)  # a parameter the step would silently ignore
    with pytest.raises(ValueError, match="extra"):
        CompiledDecoder(model, compile=False)


def test_falls_back_to_the_model_when_compilation_fails(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("no C compiler")

    monkeypatch.setattr(decode, "compiled_step", lambda: broken)
    monkeypatch.setattr(engine, "_compile_failed", False)
    model = tiny(block_size=64, **GPT2)
    with caplog.at_level(logging.WARNING, logger="gptforge.inference.engine"):
        out = run(Engine(model, compile=True))
    assert out == run(Engine(model))
    assert "compiled decoding unavailable" in caplog.text


@pytest.mark.slow
def test_compiled_step_matches_the_model():
    pytest.importorskip("torch._inductor")
    model = tiny(block_size=64, **LLAMA)
    fast = Engine(model, compile=True)
    assert run(fast, settings=SamplingSettings(max_new_tokens=12, temperature=0)) == \
        run(Engine(model), settings=SamplingSettings(max_new_tokens=12, temperature=0))
    assert fast.decoder is not None, "torch.compile failed on this machine"


def test_a_model_the_step_does_not_cover_decodes_through_the_model(caplog):
    model = tiny(block_size=64, n_experts=4)  # mixture of experts: not in the compiled step
    with caplog.at_level(logging.WARNING, logger="gptforge.inference.engine"):
        out = run(Engine(model, compile=True))
    assert out == run(Engine(model))
    assert "does not support this model" in caplog.text


def record_prefills(model) -> list[tuple[int, int]]:
    """(cached positions, new tokens) of each prefill the model runs from now on."""
    prefills = []

    def hook(module, args, kwargs):
        if kwargs.get("logits_to_keep"):  # prefill and window refills ask for the last logits
            cache = kwargs.get("kv_cache")
            prefills.append((cache.pos if cache is not None else 0, args[0].size(1)))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return prefills


@pytest.mark.parametrize("compile", [False, True], ids=["model", "step"])
def test_a_kept_cache_prefills_only_new_tokens_and_changes_nothing(compile, eager_step):
    model = tiny(block_size=64, **LLAMA)
    fresh = Engine(model)
    kept = Engine(model, compile=compile)
    cache = kept.new_cache()
    prefills = record_prefills(model)
    settings = SamplingSettings(max_new_tokens=8, temperature=0)
    first = [1, 2, 3, 4, 5]
    out = [t[0] for t in run(kept, first, settings, cache=cache)]
    assert out == [t[0] for t in run(fresh, first, settings)]
    # The cache holds the prompt and the tokens fed back: all replies but the last.
    assert cache.pos == 5 + 7 and cache.ids[0, :cache.pos].tolist() == first + out[:-1]
    growing = first + out + [6, 7]  # the next prompt appends to the whole exchange
    diverging = growing[:3] + [9, 9, 9]  # differs from position 3 on
    for prompt, shared in ((growing, len(first) + 7), (diverging, 3)):
        prefills.clear()
        assert run(kept, prompt, settings, cache=cache) == run(fresh, prompt, settings)
        assert prefills[0] == (shared, len(prompt) - shared)
    assert kept.compile == compile and (kept.decoder is not None) == compile
    prefills.clear()
    run(kept, diverging, settings, cache=cache)  # the same prompt again: only its last token runs
    assert prefills == [(len(diverging) - 1, 1)]


def test_a_kept_cache_with_a_prompt_longer_than_the_window_starts_over(eager_step):
    model = tiny(block_size=16, **GPT2)
    kept = Engine(model, compile=True)
    cache = kept.new_cache()
    settings = SamplingSettings(max_new_tokens=30, temperature=0)
    short, long = [1, 2, 3], list(range(1, 21))
    for prompt in (short, long, short):  # the window slides within and across calls
        assert run(kept, prompt, settings, cache=cache) == run(Engine(model), prompt, settings)


def test_a_repetition_penalty_must_be_positive():
    eng = Engine(tiny(**GPT2))
    for penalty in (0.0, -1.2):  # inf logits (NaN probabilities) or flipped signs
        with pytest.raises(GptforgeError, match="repetition_penalty must be > 0"):
            run(eng, settings=SamplingSettings(temperature=1.0, repetition_penalty=penalty))
    assert len(run(eng, settings=SamplingSettings(max_new_tokens=3, repetition_penalty=1.3))) == 3


def test_a_kept_cache_must_have_one_row_per_sample():
    eng = Engine(tiny(**GPT2))
    with pytest.raises(ValueError, match="cache holds 1 rows"):
        run(eng, num_samples=2, cache=eng.new_cache(1))
