"""Activation checkpointing: memory saved vs time lost, on one training step.

Memory is measured directly: the bytes of tensors autograd saves for backward during the forward
pass (``saved_tensors_hooks``), which is what checkpointing reduces. Time is the median of
interleaved steps (off, on, off, on, ...) so machine noise hits both alike.

    python benchmarks/activation_checkpointing.py --n-layer 6 --n-embd 384 \
        --block-size 256 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from gptforge.model import GPT, ModelConfig
from gptforge.model.loss import token_cross_entropy
from gptforge.runtime.activation_checkpointing import apply_activation_checkpointing


def build(args, checkpointed: bool) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=args.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                            n_embd=args.n_embd, block_size=args.block_size))
    if checkpointed:
        apply_activation_checkpointing(model)
    return model


def saved_bytes(model, x, y, dtype) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = token_cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def step_time(model, x, y, dtype) -> float:
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = token_cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--n-embd", type=int, default=384)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=65)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size))
    y = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size))
    models = {"off": build(args, False), "on": build(args, True)}
    memory = {k: saved_bytes(m, x, y, dtype) for k, m in models.items()}  # also warms up
    times = {k: [] for k in models}
    for _ in range(args.repeats):
        for k, m in models.items():
            times[k].append(step_time(m, x, y, dtype))
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'checkpointing':>14} {'saved activations':>18} {'fwd+bwd (median)':>17}")
    for k in models:
        print(f"{k:>14} {memory[k] / 2**20:>15.1f} MiB {median[k] * 1000:>14.0f} ms")
    print(f"memory saved: {1 - memory['on'] / memory['off']:.0%}, "
          f"time added: {median['on'] / median['off'] - 1:+.0%}")
    print(json.dumps({"saved_bytes": memory, "median_s": median, "args": vars(args)}))


if __name__ == "__main__":
    main()
