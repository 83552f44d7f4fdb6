"""Training tokens/s and MFU with 1 process vs N processes (torchrun), same global batch.

Runs the real `gptforge train` command on a synthetic character corpus: once as a single process
(all cores to it), once under `torchrun --nproc-per-node N` with `runtime.parallel` DDP or FSDP2
(OMP threads split between the processes), and reports the median of the logged tokens/s and MFU,
skipping the first logged lines (warm-up).

    python benchmarks/distributed_throughput.py --nproc 2 --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(cmd: list[str], env: dict) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-2000:])


def medians(run_dir: Path, skip: int) -> tuple[float, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "tokens_per_sec" in r][skip:]
    return (statistics.median(r["tokens_per_sec"] for r in train),
            statistics.median(r["mfu"] for r in train))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--global-batch", type=int, default=16, help="sequences per optimizer step")
    p.add_argument("--model", default="model.n_layer=4 model.n_head=4 model.n_embd=256 "
                                      "model.block_size=128")
    p.add_argument("--dtype", default="auto")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="gptforge-dist-bench-"))
    corpus = tmp / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n"
                              for i in range(60_000)))
    gf = [sys.executable, "-m", "gptforge"]
    run(gf + ["prepare", "--input", str(corpus), "--tokenizer", "char", "--out",
              str(tmp / "data"), "--no-progress"], dict(os.environ))
    common = ["train", f"data.dir={tmp / 'data'}", f"train.max_steps={args.steps}",
              "train.log_interval=2", "train.eval_interval=100000", "train.ckpt_interval=100000",
              "train.sample_tokens=0", "runtime.progress=false", "runtime.tensorboard=false",
              f"runtime.dtype={args.dtype}", *args.model.split()]
    results = {}
    env = dict(os.environ, OMP_NUM_THREADS=str(cores))
    run(gf + common + [f"train.out_dir={tmp / 'single'}",
                       f"train.batch_size={args.global_batch}"], env)
    results["1 process"] = medians(tmp / "single", skip=2)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // args.nproc)))
    for strategy in ("ddp", "fsdp"):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", str(args.nproc), "-m", "gptforge"]
        run(launcher + common + [f"train.out_dir={tmp / strategy}",
                                 f"train.batch_size={args.global_batch // args.nproc}",
                                 f"runtime.parallel={strategy}"], env)
        results[f"{args.nproc} processes, {strategy}"] = medians(tmp / strategy, skip=2)
    base = results["1 process"][0]
    print(f"{'setup':>24} {'tokens/s':>10} {'MFU':>7} {'vs 1 process':>13}")
    for name, (tok_s, mfu) in results.items():
        print(f"{name:>24} {tok_s:>10,.0f} {mfu:>7.1%} {tok_s / base:>12.2f}x")
    print(json.dumps({"cores": cores, "args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
