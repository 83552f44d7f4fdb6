"""``gptforge plan``: parameters, FLOPs, memory and time of a run, before running it."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="before a run: parameters, FLOPs, memory, measured speed, time, GPU estimates",
        description="Show what a `gptforge train` run of this config needs: parameters, FLOPs "
                    "per token, a memory estimate (weights, gradients, optimizer state, "
                    "activations with and without activation checkpointing), tokens/s and MFU "
                    "measured on this device over a few steps, the time to train.max_steps, and "
                    "estimates for common GPUs. Takes the same -c and overrides as train.")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.add_argument("-c", "--config", help="TOML file or preset name (default: shakespeare_char)")
    p.add_argument("--steps", type=int, default=3, metavar="N",
                   help="training steps to time on this device, after a warm-up (0: none; "
                        "default: 3)")
    p.add_argument("--memory-gb", type=float, metavar="GB",
                   help="memory to fit the micro-batch into (default: this device's)")
    p.add_argument("--mfu", type=float, default=None, metavar="F",
                   help="MFU assumed for the GPU estimates, 0 to 1 (default: 0.4)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from gptforge.config.loader import DEFAULT_PRESET, load_config
    from gptforge.errors import GptforgeError
    from gptforge.train import plan

    mfu = plan.DEFAULT_MFU if args.mfu is None else args.mfu
    if not 0 < mfu <= 1:
        raise GptforgeError(f"--mfu must be above 0 and at most 1; got {mfu:g}")
    if args.memory_gb is not None and args.memory_gb <= 0:
        raise GptforgeError(f"--memory-gb must be positive; got {args.memory_gb:g}")
    if args.steps < 0:
        raise GptforgeError(f"--steps must be 0 or more; got {args.steps}")
    source = args.config or DEFAULT_PRESET
    cfg = load_config(source, args.overrides)
    result = plan.make_plan(cfg, source, steps=args.steps, memory_gb=args.memory_gb, mfu=mfu)
    if args.json:
        print(json.dumps(plan.to_dict(result), indent=2))
    else:
        print(plan.format_plan(result, mfu), end="")
    return 0
