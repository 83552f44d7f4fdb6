"""``gptforge sweep``: tune hyperparameters with many short training runs (Optuna)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gptforge.sweep import METRICS, SAMPLERS  # the package's __init__ alone: no optuna import


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="tune hyperparameters: short training trials, pruned, resumable",
        description="Run short `gptforge train` trials with swept config values and find the "
                    "best. Each trial is its own process in SWEEP_DIR/trial-N; the study lives in "
                    "SWEEP_DIR, so running the same command again continues a stopped sweep. "
                    "Writes results.csv, results.md, objective.png and best.toml. Needs optuna: "
                    "pip install 'gptforge[sweep]'.")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides applied to every trial")
    p.add_argument("-c", "--config", help="TOML file or preset name (default: shakespeare_char)")
    p.add_argument("--param", action="append", default=[], metavar="section.key=SPEC",
                   help="a swept key (repeatable). SPEC: log:LO:HI (log-uniform), LO:HI "
                        "(uniform), int:LO:HI (integers), or a,b,c (choices)")
    p.add_argument("--trials", type=int, metavar="N",
                   help="trials the study should hold (default: 20; with --sampler grid, the "
                        "whole grid)")
    p.add_argument("--budget", type=int, required=True, metavar="STEPS",
                   help="optimizer steps per trial (sets train.max_steps of each trial)")
    p.add_argument("--out", metavar="SWEEP_DIR",
                   help="sweep directory (default: the config's train.out_dir + '-sweep')")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe",
                   help="tpe (Bayesian, default), random, or grid (every combination)")
    p.add_argument("--metric", choices=METRICS, default="val_loss",
                   help="what to minimise: the trial's last logged value (default: val_loss)")
    p.add_argument("--jobs", type=int, default=1, metavar="J",
                   help="trials run side by side as separate processes (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default: 0)")
    p.add_argument("--no-prune", action="store_true",
                   help="run every trial to the end (default: stop a trial whose value is worse "
                        "than the median of earlier trials at the same step)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gptforge.config.loader import DEFAULT_PRESET, load_config
    from gptforge.errors import GptforgeError

    try:
        from gptforge.sweep import space, study
    except ImportError as err:
        if err.name != "optuna":
            raise
        raise GptforgeError("sweeps need optuna: pip install 'gptforge[sweep]'") from None
    config = args.config or DEFAULT_PRESET
    params = space.parse_params(args.param, config, args.overrides)
    out = Path(args.out) if args.out else \
        Path(load_config(config, args.overrides).train.out_dir + "-sweep")
    sweep = study.Sweep(config=config, overrides=args.overrides, params=params,
                        budget=args.budget, out_dir=out, trials=args.trials, sampler=args.sampler,
                        metric=args.metric, jobs=args.jobs, seed=args.seed,
                        prune=not args.no_prune)
    result = study.run_sweep(sweep)
    return 0 if any(t.value is not None for t in result.get_trials(deepcopy=False)) else 1
