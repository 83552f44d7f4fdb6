"""The memory estimate of a training step against facts measured outside it: the state real torch
optimizers allocate, and the peak resident memory of a real CPU step (read from the kernel)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from gptforge.config.schema import OptimConfig
from gptforge.model.config import ModelConfig
from gptforge.model.gpt import GPT
from gptforge.runtime import memory
from gptforge.train.optim import build_optimizer

TINY = dict(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=16)


@pytest.mark.parametrize("name", ["adamw", "muon", "adafactor"])
def test_optimizer_state_matches_what_the_optimizer_allocates(name):
    model = GPT(ModelConfig(**TINY))
    optimizer = build_optimizer(model, OptimConfig(name=name, fused="false"),
                                torch.device("cpu"))
    predicted = memory.optimizer_state_bytes(optimizer)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    allocated = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                    for t in state.values() if isinstance(t, torch.Tensor) and t.dim() > 0)
    assert predicted == allocated


def test_activations_grow_linearly_and_checkpointing_saves_most_of_them():
    cfg = ModelConfig(**{**TINY, "n_layer": 8})
    one, four = (memory.activation_bytes(cfg, b, 16, 4) for b in (1, 4))
    assert four == 4 * one
    assert memory.activation_bytes(cfg, 4, 16, 4, checkpointing=True) < four / 2


# Runs in a fresh process whose large allocations are all mmap'd (MALLOC_MMAP_THRESHOLD_), so
# freed tensors return to the kernel and the resident set follows the live tensors.
MEASURE = r"""
import json, sys, torch
from gptforge.config.schema import OptimConfig
from gptforge.model.config import ModelConfig
from gptforge.model.gpt import GPT
from gptforge.runtime import memory
from gptforge.runtime.activation_checkpointing import apply_activation_checkpointing
from gptforge.train.objectives import LanguageModeling
from gptforge.train.optim import build_optimizer

def kernel(key):  # bytes, from /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

torch.set_num_threads(1)
results = []
for spec in json.loads(sys.argv[1]):
    cfg, batch, ckpt = ModelConfig(**spec["model"]), spec["batch"], spec["checkpointing"]
    model = GPT(cfg)
    if ckpt:
        apply_activation_checkpointing(model)
    optimizer = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))
    def step():
        loss, _ = LanguageModeling()(model, (x, x))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step(); step()  # optimizer state exists, kernels warmed up
    resident = sum(t.untyped_storage().nbytes() for t in model.parameters()) + sum(
        t.untyped_storage().nbytes() for s in optimizer.state.values() for t in s.values())
    before = kernel("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from here
    step()
    measured = resident + kernel("VmHWM") - before
    estimate = memory.estimate(model, optimizer, cfg, batch, cfg.block_size, 4).total(ckpt)
    results.append({"measured": measured, "estimate": estimate})
print(json.dumps(results))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_estimate_is_within_20_percent_of_the_measured_peak_on_cpu():
    gpt2 = dict(vocab_size=65, n_layer=4, n_head=4, n_embd=128, block_size=128)
    llama = dict(gpt2, norm="rmsnorm", pos_emb="rope", mlp="swiglu", bias=False,
                 tie_embeddings=False, n_kv_head=2, vocab_size=512)
    specs = [{"model": gpt2, "batch": 16, "checkpointing": False},
             {"model": gpt2, "batch": 16, "checkpointing": True},
             {"model": llama, "batch": 8, "checkpointing": False},
             {"model": dict(gpt2, n_experts=4, moe_top_k=2), "batch": 8, "checkpointing": False}]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(specs)], env=env,
                         capture_output=True, text=True, check=True, timeout=120)
    for spec, r in zip(specs, json.loads(out.stdout)):
        assert r["measured"] > 20e6, (spec, r)  # tens of MB: well above the RSS noise
        assert 0.8 <= r["estimate"] / r["measured"] <= 1.2, (spec, r)
