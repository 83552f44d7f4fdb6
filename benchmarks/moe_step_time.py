"""Mixture-of-experts vs dense: training step time of small models on this machine.

Variants (same attention, same data, float32, AdamW):

- ``dense``: the plain model, MLP hidden width 4*n_embd.
- ``moe``: ``MoEMLP`` in every block, ``--experts`` experts, ``--top-k`` per token, each expert
  ``4*n_embd / top_k`` wide, so the active FLOPs per token equal the dense model's while the MLP
  parameters grow ``experts / top_k`` times.
- ``moe-wide``: the same with full-width experts (``top_k`` times the dense MLP's FLOPs).
- ``moe-padded``: ``moe`` with a batched-weights dispatch instead of one ``MLP`` per expert:
  expert weights stacked as (E, C, H), tokens gathered into an (E, max_count, C) tensor padded to
  the busiest expert, one ``baddbmm`` per matmul. The alternative ``moe.py`` did not take.

Steps run interleaved (dense, moe, ..., dense, moe, ...) so machine noise hits all variants
alike; the table reports the median step time (forward, backward, optimizer step).

    python benchmarks/moe_step_time.py --n-layer 4 --n-embd 128 --block-size 128 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from gptforge.model import GPT, ModelConfig
from gptforge.model.moe import MoEMLP
from gptforge.train.objectives import LanguageModeling


class PaddedMoEMLP(MoEMLP):
    """``MoEMLP`` (GELU experts) with stacked expert weights and a padded batched matmul."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        E, C, H = cfg.n_experts, cfg.n_embd, cfg.moe_expert_hidden or cfg.hidden_dim
        del self.experts
        self.w_up = nn.Parameter(torch.randn(E, C, H) * cfg.init_std)
        self.b_up = nn.Parameter(torch.zeros(E, 1, H))
        self.w_down = nn.Parameter(torch.randn(E, H, C) * cfg.init_std)
        self.b_down = nn.Parameter(torch.zeros(E, 1, C))

    def dispatch(self, x, weights, experts, counts):
        N, k = experts.shape
        flat = experts.flatten()
        order = flat.argsort(stable=True)  # (N*k,) assignments grouped by expert
        expert_of = flat[order]
        slot = torch.arange(N * k, device=x.device) - (counts.cumsum(0) - counts)[expert_of]
        padded = x.new_zeros(self.n_experts, int(counts.max()), x.size(1))  # (E, max_count, C)
        padded[expert_of, slot] = x[order // k]
        h = F.gelu(torch.baddbmm(self.b_up, padded, self.w_up), approximate="tanh")
        out = torch.baddbmm(self.b_down, h, self.w_down)[expert_of, slot]  # (N*k, C)
        unsorted = torch.empty_like(out)
        unsorted[order] = out
        return (unsorted.view(N, k, -1) * weights.unsqueeze(-1)).sum(dim=1)


def build(args, variant: str) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=args.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
               n_embd=args.n_embd, block_size=args.block_size)
    if variant != "dense":
        narrow = 4 * args.n_embd // args.top_k
        cfg.update(n_experts=args.experts, moe_top_k=args.top_k,
                   moe_expert_hidden=0 if variant == "moe-wide" else narrow)
    model = GPT(ModelConfig(**cfg))
    if variant == "moe-padded":
        for block in model.blocks:
            block.mlp = PaddedMoEMLP(model.config)
    return model


def step_time(model, optimizer, batch) -> float:
    t0 = time.perf_counter()
    loss, _ = LanguageModeling()(model, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=65)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    variants = ["dense", "moe", "moe-wide", "moe-padded"]
    models = {v: build(args, v) for v in variants}
    optimizers = {v: torch.optim.AdamW(m.parameters(), lr=1e-3) for v, m in models.items()}
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size + 1))
    batch = (x[:, :-1], x[:, 1:])
    times = {v: [] for v in variants}
    for r in range(args.repeats + 2):
        for v in variants:
            t = step_time(models[v], optimizers[v], batch)
            if r >= 2:  # warm-up
                times[v].append(t)
    median = {v: statistics.median(t) for v, t in times.items()}
    tokens = args.batch_size * args.block_size
    print(f"{'variant':>10} {'params':>8} {'active':>8} {'GFLOP/tok':>10} {'step (median)':>14} "
          f"{'tok/s':>8}")
    for v in variants:
        m = models["moe" if v == "moe-padded" else v]  # same architecture, same counts
        print(f"{v:>10} {m.num_params() / 1e6:>7.2f}M {m.num_active_params() / 1e6:>7.2f}M "
              f"{m.flops_per_token() / 1e9:>10.4f} {median[v] * 1000:>11.1f} ms "
              f"{tokens / median[v]:>8,.0f}")
    print(json.dumps({"median_s": median, "threads": torch.get_num_threads(), "args": vars(args)}))


if __name__ == "__main__":
    main()
