"""Continuous batching on token ids: rows that join and leave a running batch get the tokens
``Engine.generate`` gives each of them alone (greedy, seeded sampling, repetition penalty, banned
ids), on GPT-2 and Llama layouts, and slot reuse keeps a freed row's prefix."""

import pytest
import torch

from gptforge.inference import decode
from gptforge.inference.batching import BatchDecoder
from gptforge.inference.decode import decode_step
from gptforge.inference.engine import Engine, SamplingSettings, SequenceSampler
from gptforge.model import GPT, ModelConfig

LLAMA = dict(norm="rmsnorm", pos_emb="rope", mlp="swiglu", n_kv_head=2, bias=False,
             tie_embeddings=False)
REQUESTS = [  # (prompt, settings, banned ids, the step at which it joins)
    ([1, 2, 3], SamplingSettings(max_new_tokens=12, temperature=0), [], 0),
    ([5] * 11, SamplingSettings(max_new_tokens=7, temperature=1.0, top_p=0.9, seed=4), [], 0),
    ([7, 8], SamplingSettings(max_new_tokens=9, temperature=0, repetition_penalty=1.5),
     [9, 10], 3),
    ([4, 4, 6, 1, 2], SamplingSettings(max_new_tokens=5, temperature=0.8, top_k=5, seed=1),
     [], 8),
]


def tiny(**arch) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, n_layer=2, n_head=4, n_embd=32, block_size=32,
                      init_std=0.3, **arch)
    return GPT(cfg).eval()


def alone(engine: Engine, prompt, settings, banned) -> list[int]:
    return [int(step[0]) for step in engine.generate(prompt, settings, banned_ids=banned)]


def together(decoder: BatchDecoder, requests) -> list[list[int]]:
    """A minimal scheduler: join at the given step, sample, decode the rows still running."""
    out = [[] for _ in requests]
    running: dict[int, tuple[int, SequenceSampler, torch.Tensor]] = {}  # request: slot, sampler,
    free, step = list(range(decoder.slots)), 0                     # logits
    while step == 0 or running or any(j >= step for *_, j in requests):
        for i, (prompt, settings, banned, joins) in enumerate(requests):
            if joins == step:
                slot = decoder.best_slot(free, prompt)
                free.remove(slot)
                sampler = SequenceSampler(prompt, 1, settings, banned, 50, torch.device("cpu"))
                running[i] = (slot, sampler, decoder.prefill(slot, prompt))
        fed = {}
        for i, (_, sampler, logits) in list(running.items()):
            out[i].append(int(sampler.sample(logits)[0]))
            if len(out[i]) == requests[i][1].max_new_tokens:
                free.append(running.pop(i)[0])
            else:
                fed[i] = out[i][-1]
        if fed:
            logits = decoder.decode([running[i][0] for i in fed], torch.tensor(list(fed.values())))
            for row, i in enumerate(fed):
                running[i] = (*running[i][:2], logits[row:row + 1])
        step += 1
    return out


@pytest.mark.parametrize("arch", [{}, LLAMA], ids=["gpt2", "llama"])
def test_rows_joining_and_leaving_get_the_tokens_they_get_alone(arch):
    engine = Engine(tiny(**arch))
    expected = [alone(engine, p, s, b) for p, s, b, _ in REQUESTS]
    assert together(BatchDecoder(engine, slots=3), REQUESTS) == expected
    assert len({tuple(e) for e in expected}) == len(expected)  # varied, not one token


def test_a_freed_slot_serves_a_prompt_that_continues_it():
    engine = Engine(tiny(**LLAMA))
    decoder = BatchDecoder(engine, slots=2)
    decoder.prefill(1, [1, 2, 3, 4, 5])
    assert decoder.best_slot([0, 1], [1, 2, 3, 9]) == 1
    assert decoder.best_slot([0, 1], [6, 2]) == 0  # nothing shared: the lowest slot
    fed = []
    engine.model.register_forward_pre_hook(lambda m, args: fed.append(args[0].size(1)))
    logits = decoder.prefill(1, [1, 2, 3, 4, 5, 6, 7])
    assert fed == [2]  # only the new tokens
    torch.testing.assert_close(logits, engine._prefill(torch.tensor([[1, 2, 3, 4, 5, 6, 7]]),
                                                       None))


def test_a_lone_row_decodes_through_the_compiled_step(monkeypatch):
    monkeypatch.setattr(decode, "compiled_step", lambda: decode_step)  # its math, uncompiled
    model = tiny(**LLAMA)
    requests = REQUESTS[:1]
    expected = together(BatchDecoder(Engine(model), slots=2), requests)
    engine = Engine(model, compile=True)
    assert together(BatchDecoder(engine, slots=2), requests) == expected
    assert engine.decoder is not None  # the step was used
