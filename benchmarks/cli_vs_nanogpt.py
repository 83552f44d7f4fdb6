"""Tokens/s of ``gptforge train`` end to end against nanoGPT's own ``train.py``, as users run them.

Both programs run as subprocesses on the same Shakespeare characters (gptforge's built-in corpus,
prepared once; its token stream is also written as nanoGPT's ``train.bin``/``val.bin``/``meta.pkl``
in a scratch directory, so nanoGPT's ``prepare.py`` and its download are not needed), with the same
model, batch and dropout. Everything each program does per step counts: data loading, logging,
metrics files, TensorBoard (gptforge's default), the progress machinery. Evaluation is left out on
both sides, as nanoGPT's per-step time leaves it out: the figures come from each program's own
per-step log (nanoGPT's ``iter N: ... time X ms`` lines at ``--log_interval=1``; gptforge's
``metrics.jsonl`` ``tokens_per_sec`` at ``train.log_interval=1``), after ``--warmup`` steps.

The runs alternate (nanoGPT, gptforge, nanoGPT, gptforge, ...) so that load from other processes
hits both alike; the table gives the median over steps and rounds and the ratio.

    python benchmarks/cli_vs_nanogpt.py --nanogpt-dir /work/nanoGPT --shape small --rounds 2
    python benchmarks/cli_vs_nanogpt.py --nanogpt-dir /work/nanoGPT --shape 6L384 --steps 30

``--quality`` instead trains each program once for ``--steps`` steps as its README runs it
(nanoGPT: its CPU command, evaluation every 250 steps on 20 batches; gptforge: the default preset's
optimizer and schedule at the same model and batch, evaluation every 250 steps on 20 batches) and
reports each process's whole wall time and its own final validation loss estimate:

    python benchmarks/cli_vs_nanogpt.py --nanogpt-dir /work/nanoGPT --quality --steps 2000
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gptforge.data.prepare import ensure_builtin
from gptforge.data.shards import open_split
from gptforge.metrics.sinks import read_metrics

SHAPES = {  # n_layer, n_head, n_embd, block_size, batch_size
    "small": (4, 4, 128, 64, 12),  # nanoGPT's CPU config (its README)
    "6L384": (6, 6, 384, 256, 16),  # nanoGPT's train_shakespeare_char.py model, batch 16
}


def prepare_data(scratch: Path) -> Path:
    """gptforge's built-in Shakespeare characters, prepared as ``gptforge train`` does."""
    data = scratch / "data" / "shakespeare_char"
    if not (data / "manifest.json").exists():
        ensure_builtin("shakespeare", data, tokenizer="char")
    return data


def write_nanogpt_data(data: Path, workdir: Path, nanogpt: Path) -> None:
    """nanoGPT's layout in ``workdir``: its scripts linked, data/shakespeare_char written."""
    for name in ("train.py", "model.py", "configurator.py", "config"):
        link = workdir / name
        if not link.exists():
            link.symlink_to(nanogpt / name)
    out = workdir / "data" / "shakespeare_char"
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        tokens = np.concatenate([np.asarray(s) for s in open_split(data, split)])
        tokens.astype(np.uint16).tofile(out / f"{split}.bin")
    vocab = json.loads((data / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    with open(out / "meta.pkl", "wb") as f:  # nanoGPT reads vocab_size from it
        pickle.dump({"vocab_size": vocab}, f)


def run_nanogpt(workdir: Path, shape, steps: int, dropout: float) -> list[float]:
    n_layer, n_head, n_embd, block, batch = shape
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu",
           "--compile=False", "--eval_iters=20", "--log_interval=1", f"--block_size={block}",
           f"--batch_size={batch}", f"--n_layer={n_layer}", f"--n_head={n_head}",
           f"--n_embd={n_embd}", f"--max_iters={steps}", f"--lr_decay_iters={steps}",
           f"--eval_interval={steps}", f"--dropout={dropout}", "--out_dir=out",
           f"--warmup_iters={min(100, steps // 10)}"]  # its config's 100 divides by zero at 100
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, check=True)
    times = {int(i): float(ms) for i, ms in
             re.findall(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms", proc.stdout, re.M)}
    tokens = block * batch
    # Iteration 0 and the last one include evaluation.
    return [tokens / (times[i] / 1e3) for i in sorted(times) if 0 < i < steps]


def run_gptforge(scratch: Path, data: Path, shape, steps: int, dropout: float,
                 extra: list[str]) -> list[float]:
    n_layer, n_head, n_embd, block, batch = shape
    out = scratch / "gptforge_run"
    cmd = [sys.executable, "-m", "gptforge", "train", f"data.dir={data}", f"train.out_dir={out}",
           "--overwrite", f"model.n_layer={n_layer}", f"model.n_head={n_head}",
           f"model.n_embd={n_embd}", f"model.block_size={block}", f"model.dropout={dropout}",
           f"train.batch_size={batch}", f"train.max_steps={steps}", "train.log_interval=1",
           f"train.eval_interval={steps}", "train.eval_steps=20", f"train.ckpt_interval={steps}",
           "train.sample_tokens=0", "train.num_samples=0", "runtime.progress=false", *extra]
    subprocess.run(cmd, cwd=scratch, capture_output=True, text=True, check=True)
    return [r["tokens_per_sec"] for r in read_metrics(out / "metrics.jsonl")
            if "tokens_per_sec" in r and r["step"] < steps]


def quality(scratch: Path, data: Path, nano_dir: Path, steps: int, extra: list[str]) -> None:
    n_layer, n_head, n_embd, block, batch = SHAPES["small"]
    nano_cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu",
                "--compile=False", "--eval_iters=20", "--log_interval=1", f"--block_size={block}",
                f"--batch_size={batch}", f"--n_layer={n_layer}", f"--n_head={n_head}",
                f"--n_embd={n_embd}", f"--max_iters={steps}", f"--lr_decay_iters={steps}",
                "--dropout=0.0", "--out_dir=out"]  # nanoGPT's README CPU command
    t0 = time.perf_counter()
    out = subprocess.run(nano_cmd, cwd=nano_dir, capture_output=True, text=True, check=True)
    nano_s = time.perf_counter() - t0
    nano_val = float(re.findall(r"^step \d+: train loss [\d.]+, val loss ([\d.]+)", out.stdout,
                                re.M)[-1])
    run = scratch / "gptforge_quality"
    forge_cmd = [sys.executable, "-m", "gptforge", "train", f"data.dir={data}",
                 f"train.out_dir={run}", "--overwrite", f"model.n_layer={n_layer}",
                 f"model.n_head={n_head}", f"model.n_embd={n_embd}", f"model.block_size={block}",
                 "model.dropout=0", f"train.batch_size={batch}", f"train.max_steps={steps}",
                 "train.eval_interval=250", "train.eval_steps=20", "runtime.progress=false",
                 *extra]
    t0 = time.perf_counter()
    subprocess.run(forge_cmd, cwd=scratch, capture_output=True, text=True, check=True)
    forge_s = time.perf_counter() - t0
    forge_val = [r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r][-1]
    print("| program | wall time (whole process) | final val loss (own estimate) |")
    print("|---|---|---|")
    print(f"| nanoGPT train.py | {nano_s:.1f} s | {nano_val:.4f} |")
    print(f"| gptforge train | {forge_s:.1f} s | {forge_val:.4f} |")
    print(f"gptforge - nanoGPT: {forge_val - nano_val:+.4f} in {forge_s / nano_s:.2f}x the time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt-dir", type=Path, required=True)
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of each run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--scratch", type=Path, default=None)
    parser.add_argument("--quality", action="store_true",
                        help="train --steps once each; compare wall time and val loss")
    parser.add_argument("gptforge_overrides", nargs="*", help="e.g. runtime.dtype=float32")
    args = parser.parse_args()
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="cli_vs_nanogpt_"))
    scratch.mkdir(parents=True, exist_ok=True)
    data = prepare_data(scratch)
    nano_dir = scratch / "nanogpt"
    nano_dir.mkdir(exist_ok=True)
    write_nanogpt_data(data, nano_dir, args.nanogpt_dir.resolve())
    if args.quality:
        quality(scratch, data, nano_dir, args.steps, args.gptforge_overrides)
        return
    shape = SHAPES[args.shape]
    results: dict[str, list[float]] = {"nanoGPT": [], "gptforge": []}
    for r in range(args.rounds):
        nano = run_nanogpt(nano_dir, shape, args.steps, args.dropout)[args.warmup:]
        forge = run_gptforge(scratch, data, shape, args.steps, args.dropout,
                             args.gptforge_overrides)[args.warmup:]
        results["nanoGPT"] += nano
        results["gptforge"] += forge
        print(f"round {r + 1}: nanoGPT {statistics.median(nano):,.0f} tok/s, gptforge "
              f"{statistics.median(forge):,.0f} tok/s", flush=True)
    choice = scratch / "gptforge_run" / "runtime_choice.json"
    if choice.exists():
        print("gptforge runtime:", json.loads(choice.read_text())["candidate"])
    nano, forge = (statistics.median(results[k]) for k in ("nanoGPT", "gptforge"))
    print(f"| {args.shape} dropout {args.dropout:g} | nanoGPT {nano:,.0f} | gptforge {forge:,.0f}"
          f" | {forge / nano:.2f}x |")
    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'default')}")


if __name__ == "__main__":
    main()
