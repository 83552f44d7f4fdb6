"""Validation loss after the same wall-clock training budget: gptforge against nanoGPT.

Throughput alone does not say whether the faster side also *learns* as well per second (bf16
numerics, a padded vocabulary). Here both train the same architecture on the same character-level
Shakespeare split for the same number of seconds, one after the other, and are then evaluated on
the same fixed validation windows, in float32, by the same code.

- Data: the built-in ``shakespeare`` corpus (42 plays and poems, 5 MB, fetched into the gptforge
  cache on first use), characters as tokens, first 90% train and last 10% val (as nanoGPT's
  ``shakespeare_char/prepare.py`` splits).
- Model and hyper-parameters: nanoGPT's CPU Shakespeare run (4 layers, 4 heads, 128 wide, block
  64, batch 12, lr 1e-3, 100 warm-up steps, cosine to 1e-4, betas (0.9, 0.99), weight decay 0.1,
  clip 1.0, dropout 0.0) by default; ``--config a`` for the 6-layer 384-wide model.
- Schedules: each side's cosine schedule spans the steps it can do in the budget, estimated from
  a short calibration run (not counted in the budget), so both end their decay on time.

    python benchmarks/val_at_equal_time.py --nanogpt-dir /tmp/nanogpt --seconds 80
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from train_throughput import (
    LR,
    SHAPES,
    GptforgeRunner,
    NanoGPTRunner,
    load_nanogpt,
)

from gptforge.config.schema import ScheduleConfig
from gptforge.data.corpora import fetch_corpus

WARMUP, MIN_LR = 100, 1e-4  # nanoGPT's config/train_shakespeare_char.py


def prepare_chars(out: Path) -> int:
    """Write train.bin / val.bin (uint16 char ids) into ``out``; return the vocabulary size."""
    text = "".join(p.read_text(encoding="utf-8") for p in fetch_corpus("shakespeare"))
    chars = sorted(set(text))
    table = np.zeros(max(map(ord, chars)) + 1, dtype=np.uint16)
    table[[ord(c) for c in chars]] = np.arange(len(chars), dtype=np.uint16)
    ids = table[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]
    cut = int(0.9 * len(ids))
    ids[:cut].tofile(out / "train.bin")
    ids[cut:].tofile(out / "val.bin")
    return len(chars)


def nanogpt_lr(total_steps: int):
    """train.py's get_lr: linear warm-up, cosine decay to min_lr at lr_decay_iters."""
    def lr_at(it: int) -> float:
        if it < WARMUP:
            return LR * (it + 1) / (WARMUP + 1)
        if it > total_steps:
            return MIN_LR
        ratio = (it - WARMUP) / max(1, total_steps - WARMUP)
        return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)
    return lr_at


def val_windows(val_path: Path, block: int, n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    data = np.fromfile(val_path, dtype=np.uint16).astype(np.int64)
    starts = np.random.default_rng(seed).integers(0, len(data) - block - 1, n)
    x = torch.from_numpy(np.stack([data[s:s + block] for s in starts]))
    y = torch.from_numpy(np.stack([data[s + 1:s + 1 + block] for s in starts]))
    return x, y


@torch.no_grad()
def val_loss(forward, x: torch.Tensor, y: torch.Tensor, batch: int = 64) -> float:
    """Mean float32 cross-entropy of ``forward(x) -> logits`` over all windows."""
    total = 0.0
    for i in range(0, len(x), batch):
        logits = forward(x[i:i + batch]).float()
        total += F.cross_entropy(logits.flatten(0, 1), y[i:i + batch].flatten(),
                                 reduction="sum").item()
    return total / y.numel()


def steps_per_second(runner, seconds: float) -> float:
    runner.step()  # first-step allocations
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        runner.step()
        n += 1
    return n / (time.perf_counter() - t0)


def train_for(runner, seconds: float) -> tuple[int, float]:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        runner.step()
        n += 1
    return n, time.perf_counter() - t0


def build(name: str, args, shape, data: Path, total_steps: int, nanogpt):
    if name == "nanogpt":
        return NanoGPTRunner(nanogpt, shape, data / "train.bin", args.dropout,
                             lr_at=nanogpt_lr(total_steps))
    schedule = ScheduleConfig(name="cosine", warmup_steps=WARMUP, min_lr_ratio=MIN_LR / LR)
    return GptforgeRunner("gptforge", shape, data / "train.bin", args.dropout, dtype="auto",
                          compile_mode="default" if args.compile else None, run_dir=data,
                          max_steps=total_steps, schedule=schedule)


def run_side(name: str, args, shape, data: Path, nanogpt) -> dict:
    torch.manual_seed(args.seed)
    rate = steps_per_second(build(name, args, shape, data, 10**9, nanogpt), args.calibrate)
    total_steps = max(WARMUP + 1, int(rate * args.seconds))
    torch.manual_seed(args.seed)
    runner = build(name, args, shape, data, total_steps, nanogpt)
    runner.step()  # compiles, if compiling; not counted in the budget
    steps, elapsed = train_for(runner, args.seconds)
    if name == "nanogpt":
        model = runner.model.eval()

        def forward(x):
            return model(x, x)[0]  # with targets, nanoGPT returns logits for every position
    else:
        model = runner.trainer.model.eval()
        forward = model
    x, y = val_windows(data / "val.bin", shape.block_size, args.val_windows)
    loss = val_loss(forward, x, y)
    tokens = (steps + 1) * shape.batch_size * shape.block_size
    print(f"{name:9s} {steps + 1:6d} steps in {elapsed:5.1f} s ({tokens / elapsed:8,.0f} tok/s, "
          f"schedule sized for {total_steps}); val loss {loss:.4f}", flush=True)
    return {"side": name, "steps": steps + 1, "seconds": round(elapsed, 1),
            "tok_s": round(tokens / elapsed), "scheduled_steps": total_steps,
            "val_loss": round(loss, 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nanogpt-dir", type=Path, default=Path("/tmp/nanogpt"))
    p.add_argument("--config", default="b", choices=sorted(SHAPES))
    p.add_argument("--seconds", type=float, default=80.0, help="training budget per side")
    p.add_argument("--calibrate", type=float, default=4.0, help="seconds to measure steps/s")
    p.add_argument("--val-windows", type=int, default=400)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--compile", action="store_true", help="gptforge with runtime.compile")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    nanogpt = load_nanogpt(args.nanogpt_dir)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        vocab = prepare_chars(data)
        shape = dataclasses.replace(SHAPES[args.config], vocab_size=vocab)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {shape.name}, "
              f"vocab {vocab}; {args.seconds:.0f} s of training each, one after the other")
        rows = [run_side(name, args, shape, data, nanogpt) for name in ("nanogpt", "gptforge")]
    print(json.dumps({"benchmark": "val_at_equal_time", "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "config": args.config,
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
