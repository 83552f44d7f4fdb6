"""What a training step of ``gptforge train`` spends outside forward, backward and the optimizer.

Runs the real CLI in this process (``gptforge.cli.main``), with timers wrapped around the pieces
of each step: the objective's forward (``Objective.__call__``), ``Tensor.backward``, gradient
clipping (``get_total_norm``, ``clip_grads_with_norm_``) and the optimizer's ``step`` and
``zero_grad``. The loop's period is the time from one ``train_step`` start to the next (steps
followed by evaluation or a checkpoint are left out, as each program's own per-step timing leaves
them out). Everything else in the
period is overhead: drawing and copying the batch, loss weighting, the anomaly guard, the
learning-rate schedule, the metrics record, the progress bar, the stop checks.

    python benchmarks/step_overhead.py --steps 300                      # nanoGPT's CPU config
    python benchmarks/step_overhead.py --steps 300 runtime.tensorboard=false

The timers themselves cost a few microseconds per call; medians are over steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from gptforge.cli import main as gptforge_main
from gptforge.data.prepare import ensure_builtin
from gptforge.train import loop, objectives

SMALL = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=64",
         "model.dropout=0", "train.batch_size=12"]  # nanoGPT's CPU config (its README)


class Timers:
    def __init__(self):
        self.parts: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []
        self.starts: list[float] = []

    def wrap(self, owner, name: str, part: str) -> None:
        original = getattr(owner, name)
        timers = self

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timers.parts[part] = timers.parts.get(part, 0.0) + time.perf_counter() - t0

        setattr(owner, name, timed)

    def step_started(self) -> None:
        now = time.perf_counter()
        if self.starts:
            self.steps.append(dict(self.parts, period=now - self.starts[-1]))
        self.starts.append(now)
        self.parts = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("overrides", nargs="*", help="more gptforge train overrides")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="step_overhead_"))
    data = scratch / "shakespeare_char"
    ensure_builtin("shakespeare", data, tokenizer="char")

    timers = Timers()
    for cls in {obj for obj in vars(objectives).values()
                if isinstance(obj, type) and issubclass(obj, objectives.Objective)}:
        if "__call__" in vars(cls):
            timers.wrap(cls, "__call__", "forward")
    timers.wrap(torch.Tensor, "backward", "backward")
    timers.wrap(torch.nn.utils, "get_total_norm", "clip")
    timers.wrap(torch.nn.utils, "clip_grads_with_norm_", "clip")
    timers.wrap(torch.optim.AdamW, "step", "optimizer")
    timers.wrap(torch.optim.Optimizer, "zero_grad", "optimizer")
    original_step = loop.Trainer.train_step

    def train_step(self):
        timers.step_started()
        return original_step(self)

    loop.Trainer.train_step = train_step
    skip: set[int] = set()  # steps whose period holds an evaluation or a checkpoint
    for name in ("_evaluate", "save"):
        original = getattr(loop.Trainer, name)

        def marked(self, *a, _original=original, **kw):
            skip.add(len(timers.starts))
            return _original(self, *a, **kw)

        setattr(loop.Trainer, name, marked)
    code = gptforge_main(["train", f"data.dir={data}", f"train.out_dir={scratch / 'run'}",
                          *SMALL, f"train.max_steps={args.steps}", "train.log_interval=1",
                          f"train.eval_interval={args.steps}", "train.eval_steps=2",
                          f"train.ckpt_interval={args.steps}", "train.sample_tokens=0",
                          "train.num_samples=0", "runtime.progress=false", *args.overrides])
    if code != 0:
        sys.exit(code)
    steps = [s for i, s in enumerate(timers.steps, start=1)
             if i > args.warmup and i not in skip]
    keys = ["forward", "backward", "clip", "optimizer"]

    def ms(key: str) -> float:
        return statistics.median(s.get(key, 0.0) for s in steps) * 1e3

    period = ms("period")
    inside = statistics.median(sum(s.get(k, 0.0) for k in keys) for s in steps) * 1e3
    outside = statistics.median(s["period"] - sum(s.get(k, 0.0) for k in keys)
                                for s in steps) * 1e3
    print(f"steps timed: {len(steps)}; threads: {torch.get_num_threads()}")
    print("| part | ms per step (median) | share of the period |")
    print("|---|---|---|")
    for key in keys:
        print(f"| {key} | {ms(key):.2f} | {ms(key) / period:.1%} |")
    print(f"| forward+backward+clip+optimizer | {inside:.2f} | {inside / period:.1%} |")
    print(f"| everything else (overhead) | {outside:.2f} | {outside / period:.1%} |")
    print(f"| loop period | {period:.2f} | 100% |")


if __name__ == "__main__":
    main()
