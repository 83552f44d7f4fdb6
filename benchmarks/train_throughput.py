"""Training throughput (tokens/s) and MFU of gptforge against nanoGPT, on one machine, in one run.

Both sides train the same architecture on the same token file. The variants take turns
(A, B, C, A, B, C, ...) for several rounds, so machine noise (other processes, clock changes)
hits all of them alike; the table reports medians over rounds and the ratio to nanoGPT.

- ``nanogpt``: nanoGPT's ``train.py`` step as it runs on a CPU: float32 (its autocast context is a
  ``nullcontext`` on CPU), ``configure_optimizers`` (AdamW, not fused on CPU), gradient clipping at
  1.0, batches cut from an ``np.memmap`` at random offsets, ``loss.item()`` every ``log_interval``.
  Its model file is not part of gptforge: pass its directory with ``--nanogpt-dir``.
- ``gptforge``: gptforge's own ``Trainer.train_step`` (``BatchLoader``, ``LanguageModeling``,
  ``resolve_precision("auto")``: bf16 autocast where the CPU has native bf16, fused AdamW, clip).
- ``gptforge+compile``: the same with the model wrapped in ``torch.compile`` as ``runtime.compile``
  does; cold-compile time is reported. ``gptforge-fp32`` isolates what precision alone buys, and
  ``gptforge-noattn32`` leaves attention in bf16 (``use_float32_attention`` off).

MFU = tokens/s x training FLOPs per token (PaLM appendix B, the formula both projects use) / the
bf16 matmul peak measured at the start of the run (the best the machine can do). "tok/CPU-s"
divides by the process's CPU time instead of wall time: with one thread it is immune to the
process being descheduled by other load on a shared machine (not to shared-cache contention).

    python benchmarks/train_throughput.py --nanogpt-dir /tmp/nanogpt
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptforge.checkpoints.checkpointer import Checkpointer
from gptforge.config.schema import (
    Config,
    OptimConfig,
    RuntimeConfig,
    ScheduleConfig,
    TrainConfig,
)
from gptforge.data.loader import BatchLoader
from gptforge.model.config import ModelConfig
from gptforge.model.gpt import GPT
from gptforge.runtime.device import (
    Precision,
    measure_matmul_flops,
    resolve_precision,
    use_float32_attention,
)
from gptforge.train.loop import Trainer, TrainingParts
from gptforge.train.objectives import LanguageModeling
from gptforge.train.optim import build_optimizer
from gptforge.train.pretraining import Pretraining


@dataclass(frozen=True)
class Shape:
    name: str
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int
    log_interval: int  # nanoGPT's .item() cadence for this preset
    vocab_size: int = 65  # character-level Shakespeare


SHAPES = {
    # nanoGPT's config/train_shakespeare_char.py model at batch 16.
    "a": Shape("a: 6L 6H 384w, T=256, B=16", 6, 6, 384, 256, 16, log_interval=10),
    # nanoGPT README's CPU run: --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
    # --n_embd=128 --log_interval=1.
    "b": Shape("b: 4L 4H 128w, T=64, B=12", 4, 4, 128, 64, 12, log_interval=1),
}

LR, WEIGHT_DECAY, BETAS, GRAD_CLIP = 1e-3, 0.1, (0.9, 0.99), 1.0  # shakespeare_char values


def write_tokens(path: Path, n_tokens: int, vocab_size: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    rng.integers(0, vocab_size, n_tokens, dtype=np.uint16).tofile(path)


def flops_per_token(shape: Shape) -> int:
    """6N + 12*L*C*T with N the non-position parameters of the unpadded model (as nanoGPT)."""
    C, L, V = shape.n_embd, shape.n_layer, shape.vocab_size
    per_block = 12 * C * C + 13 * C  # qkv, proj, mlp (4x) weights + biases + two LayerNorms
    n = V * C + L * per_block + 2 * C
    return 6 * n + 12 * L * C * shape.block_size


# ---- nanoGPT, driven like its train.py on CPU ------------------------------------------------

def load_nanogpt(directory: Path):
    spec = importlib.util.spec_from_file_location("nanogpt_model", directory / "model.py")
    if spec is None or not (directory / "model.py").is_file():
        sys.exit(f"no nanoGPT model.py in {directory} (pass --nanogpt-dir)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class NanoGPTRunner:
    label = "nanogpt"

    def __init__(self, nanogpt, shape: Shape, data_path: Path, dropout: float,
                 lr_at: Callable[[int], float] | None = None):
        self.shape, self.data_path = shape, data_path
        self.lr_at = lr_at or (lambda it: LR)  # train.py's get_lr(iter_num)
        cfg = nanogpt.GPTConfig(block_size=shape.block_size, vocab_size=shape.vocab_size,
                                n_layer=shape.n_layer, n_head=shape.n_head,
                                n_embd=shape.n_embd, dropout=dropout, bias=True)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints parameter counts
            self.model = nanogpt.GPT(cfg)
            self.optimizer = self.model.configure_optimizers(WEIGHT_DECAY, LR, BETAS, "cpu")
        self.model.train()
        self.ctx = contextlib.nullcontext()  # train.py: nullcontext() when device_type == 'cpu'
        self.iter_num = 0
        self.x, self.y = self.get_batch()

    def get_batch(self):
        # train.py re-creates the memmap for every batch (to avoid a memory leak).
        data = np.memmap(self.data_path, dtype=np.uint16, mode="r")
        T, B = self.shape.block_size, self.shape.batch_size
        ix = torch.randint(len(data) - T, (B,))
        x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
        return x, y

    def step(self) -> None:
        for group in self.optimizer.param_groups:  # train.py sets the lr every iteration
            group["lr"] = self.lr_at(self.iter_num)
        with self.ctx:
            _, loss = self.model(self.x, self.y)
        self.x, self.y = self.get_batch()  # prefetched before backward, as in train.py
        # train.py's GradScaler is CUDA-only and disables itself on CPU: plain backward/step.
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.iter_num % self.shape.log_interval == 0:
            loss.item()
        self.iter_num += 1


# ---- gptforge, through its own Trainer.train_step --------------------------------------------

class GptforgeRunner:
    def __init__(self, label: str, shape: Shape, data_path: Path, dropout: float, *,
                 dtype: str, compile_mode: str | None, run_dir: Path, max_steps: int = 10**9,
                 schedule: ScheduleConfig = ScheduleConfig()):
        self.label = label
        model_cfg = ModelConfig(vocab_size=shape.vocab_size, n_layer=shape.n_layer,
                                n_head=shape.n_head, n_embd=shape.n_embd,
                                block_size=shape.block_size, dropout=dropout)
        cfg = Config(model=model_cfg,
                     train=TrainConfig(batch_size=shape.batch_size, max_steps=max_steps),
                     schedule=schedule,
                     optim=OptimConfig(lr=LR, weight_decay=WEIGHT_DECAY, beta1=BETAS[0],
                                       beta2=BETAS[1], grad_clip=GRAD_CLIP),
                     runtime=RuntimeConfig(device="cpu", dtype=dtype))
        self.precision = resolve_precision(torch.device("cpu"), dtype)
        model = GPT(model_cfg)
        if "noattn32" not in label:  # as train/launch.py does
            use_float32_attention(model, self.precision)
        train_model = model
        if compile_mode is not None:
            kwargs = {} if compile_mode == "default" else {"mode": compile_mode}
            train_model = torch.compile(model, **kwargs)
        tokens = np.memmap(data_path, dtype=np.uint16, mode="r")
        loader = BatchLoader([tokens], shape.block_size, shape.batch_size, seed=0)
        parts = TrainingParts(
            model=model, train_model=train_model,
            optimizer=build_optimizer(model, cfg.optim, self.precision.device),
            objective=LanguageModeling(), train_loader=loader, val_loader=None,
            precision=self.precision)
        self.trainer = Trainer(cfg, Pretraining(), parts,
                               Checkpointer(run_dir, tokenizer_dir=run_dir, tokenizer_info={}))
        self.trainer.model.train()

    def step(self) -> None:
        self.trainer.train_step()


# ---- measurement -------------------------------------------------------------------------------

def build_runners(args, shape: Shape, data_path: Path, run_dir: Path) -> list:
    runners = []
    for name in args.variants:
        if name == "nanogpt":
            runners.append(NanoGPTRunner(load_nanogpt(args.nanogpt_dir), shape, data_path,
                                         args.dropout))
        elif name.startswith("gptforge"):
            dtype = "float32" if "fp32" in name else "auto"
            compile_mode = None
            if "+compile" in name:
                compile_mode = name.split("+compile", 1)[1].lstrip(":") or "default"
            runners.append(GptforgeRunner(name, shape, data_path, args.dropout, dtype=dtype,
                                          compile_mode=compile_mode, run_dir=run_dir))
        else:
            sys.exit(f"unknown variant {name}")
    return runners


def measure(args, shape: Shape, data_path: Path, run_dir: Path) -> dict:
    torch.manual_seed(0)
    runners = build_runners(args, shape, data_path, run_dir)
    cold = {}
    for r in runners:  # warm-up; the first steps of a compiled model include compilation
        t0 = time.perf_counter()
        for _ in range(args.warmup_steps):
            r.step()
        cold[r.label] = time.perf_counter() - t0
    tokens_per_step = shape.batch_size * shape.block_size
    rates: dict[str, list[float]] = {r.label: [] for r in runners}
    cpu_rates: dict[str, list[float]] = {r.label: [] for r in runners}
    for rnd in range(args.rounds):
        order = runners[rnd % len(runners):] + runners[:rnd % len(runners)]
        for r in order:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                r.step()
            tokens = args.steps * tokens_per_step
            rates[r.label].append(tokens / (time.perf_counter() - t0))
            cpu_rates[r.label].append(tokens / (time.process_time() - c0))
    return {"rates": rates, "cpu_rates": cpu_rates, "cold_s": cold}


def peak_bf16() -> float:
    return measure_matmul_flops(Precision(torch.device("cpu"), torch.bfloat16), seconds=1.0)


def report(shape: Shape, result: dict, peak: float, warmup_steps: int) -> list[dict]:
    rates, cpu_rates, cold = result["rates"], result["cpu_rates"], result["cold_s"]
    base = statistics.median(rates["nanogpt"]) if "nanogpt" in rates else float("nan")
    cpu_base = statistics.median(cpu_rates["nanogpt"]) if "nanogpt" in rates else float("nan")
    fpt = flops_per_token(shape)
    print(f"\n{shape.name}  (flops/token {fpt / 1e6:.1f}M, bf16 peak {peak / 1e9:.0f} GFLOP/s)")
    print(f"{'variant':28s} {'tok/s median':>12s} {'min':>8s} {'max':>8s} {'MFU':>6s} "
          f"{'vs nanoGPT':>10s} {'tok/CPU-s':>9s} {'vs':>6s} {'warm-up s':>9s}")
    rows = []
    for label, values in rates.items():
        med, cpu_med = statistics.median(values), statistics.median(cpu_rates[label])
        mfu = med * fpt / peak
        print(f"{label:28s} {med:12,.0f} {min(values):8,.0f} {max(values):8,.0f} {mfu:6.1%} "
              f"{med / base:9.2f}x {cpu_med:9,.0f} {cpu_med / cpu_base:5.2f}x "
              f"{cold[label]:9.1f}")
        rows.append({"config": shape.name.split(":")[0], "variant": label, "tok_s": round(med),
                     "tok_s_all": [round(v) for v in values], "mfu": round(mfu, 4),
                     "ratio_vs_nanogpt": round(med / base, 3), "tok_per_cpu_s": round(cpu_med),
                     "cpu_ratio_vs_nanogpt": round(cpu_med / cpu_base, 3),
                     f"first_{warmup_steps}_steps_s": round(cold[label], 2)})
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nanogpt-dir", type=Path, default=Path("/tmp/nanogpt"))
    p.add_argument("--configs", default="a,b", help="comma-separated: a, b")
    p.add_argument("--variants", default="nanogpt,gptforge,gptforge+compile",
                   help="comma-separated: nanogpt, gptforge, gptforge-fp32, gptforge-noattn32, "
                        "gptforge+compile, gptforge+compile:MODE (e.g. max-autotune-no-cudagraphs)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=0, help="steps per variant per round "
                   "(0 = about 4k tokens x 8 for config a, 24 for b)")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--keep-compile-cache", action="store_true",
                   help="use the usual Inductor cache instead of an empty one (warm start)")
    p.add_argument("--json", type=Path, help="also append the JSON line to this file")
    args = p.parse_args(argv)
    args.variants = args.variants.split(",")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.keep_compile_cache:  # report honest cold-compile times
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"variants: {', '.join(args.variants)}; {args.rounds} interleaved rounds")
    peak = peak_bf16()
    all_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_path = Path(tmp) / "train.bin"
        write_tokens(data_path, 1_000_000, 65)
        for key in args.configs.split(","):
            shape = SHAPES[key]
            steps = args.steps or (8 if key == "a" else 24)
            result = measure(argparse.Namespace(**{**vars(args), "steps": steps}), shape,
                             data_path, Path(tmp))
            all_rows += report(shape, result, peak, args.warmup_steps)
    line = json.dumps({"benchmark": "train_throughput", "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "peak_bf16_flops": round(peak),
                       "rows": all_rows})
    print(line)
    if args.json:
        with args.json.open("a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
