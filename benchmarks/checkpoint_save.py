"""Saving and loading a checkpoint under FSDP2: full (gathered to rank 0) vs sharded (DCP).

Launches itself under torchrun (gloo, CPU): each process builds the same GPT, shards it with
FSDP2, takes one AdamW step (so the optimizer has its moments), then saves a checkpoint the way
``Trainer.save`` does for ``train.ckpt_format`` full or sharded, and loads it back. Reports wall
time of the save and of the load, and how far rank 0's resident memory peaked above its level
before the save (Linux VmHWM, reset just before): the full format gathers every weight and Adam
moment into rank 0, the sharded one does not. Each format runs in its own torchrun.

    python benchmarks/checkpoint_save.py --nproc 2 --model "n_layer=12 n_embd=768 n_head=12"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (Linux), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Make VmHWM (the peak resident memory) start again from the current VmRSS (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from gptforge.checkpoints import state as checkpoint_state
    from gptforge.checkpoints.format import read_weights
    from gptforge.checkpoints.state import weights_to_save
    from gptforge.model import GPT, ModelConfig
    from gptforge.runtime import distributed
    from gptforge.runtime.device import resolve_precision

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    info = distributed.DistInfo(rank, rank, world)
    fields = dict(kv.split("=") for kv in args.model.split())
    cfg = ModelConfig(vocab_size=50304, block_size=256, **{k: int(v) for k, v in fields.items()})
    torch.manual_seed(0)
    model = GPT(cfg)
    distributed.wrap_model(model, "fsdp", info, resolve_precision(torch.device("cpu"), "float32"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (1, 32))
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    optimizer.step()
    optimizer.zero_grad()
    out = Path(args.out)
    dist.barrier()
    reset_peak_rss()
    before = status_mib("VmRSS")
    t0 = time.perf_counter()
    if args.format == "full":
        weights = checkpoint_state.full_model_state(model)
        state = checkpoint_state.full_optimizer_state(model, optimizer)
        if rank == 0:
            from safetensors.torch import save_file

            out.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in
                       weights_to_save(model, weights).items()},
                      str(out / "model.safetensors"))
            torch.save({"optimizer": state}, out / "trainer_state.pt")
        del weights, state
    else:
        checkpoint_state.save_sharded_model(model, out / "model")
        checkpoint_state.save_sharded_optimizer(model, optimizer, out / "optimizer")
    dist.barrier()
    save_s = time.perf_counter() - t0
    grew = status_mib("VmHWM") - before
    t0 = time.perf_counter()
    if args.format == "full":
        checkpoint_state.load_full_model_state(model, read_weights(out, model))
        state = torch.load(out / "trainer_state.pt", weights_only=True)
        checkpoint_state.load_full_optimizer_state(model, optimizer, state["optimizer"])
    else:
        checkpoint_state.load_sharded_model(model, out / "model")
        checkpoint_state.load_sharded_optimizer(model, optimizer, out / "optimizer")
    dist.barrier()
    load_s = time.perf_counter() - t0
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(json.dumps({"format": args.format, "params": params, "save_s": save_s,
                          "load_s": load_s, "rank0_peak_growth_mib": grew,
                          "bytes": size}))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--model", default="n_layer=12 n_head=12 n_embd=768")
    p.add_argument("--format", choices=("full", "sharded"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.format:  # a torchrun worker
        worker(args)
        return
    results = []
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.nproc)))
    for fmt in ("sharded", "full"):
        with tempfile.TemporaryDirectory(prefix="gptforge-ckpt-bench-") as tmp:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(args.nproc), __file__, "--model", args.model,
                   "--format", fmt, "--out", str(Path(tmp) / "ckpt")]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'format':>8} {'save s':>7} {'load s':>7} {'rank-0 peak +MiB':>17} {'MB on disk':>11}")
    for r in results:
        print(f"{r['format']:>8} {r['save_s']:>7.2f} {r['load_s']:>7.2f} "
              f"{r['rank0_peak_growth_mib']:>17,.0f} {r['bytes'] / 1e6:>11,.0f}")
    print(json.dumps({"nproc": args.nproc, "model": args.model, "results": results}))


if __name__ == "__main__":
    main()
