"""``gptforge train``: pretrain a GPT from a config (default: the built-in Shakespeare preset)."""

from __future__ import annotations

import argparse

from gptforge.config.loader import DEFAULT_PRESET, load_config, to_toml


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="pretrain a model (default: character-level Shakespeare on CPU)",
        description="Pretrain a GPT. Settings: defaults < -c CONFIG < section.key=value "
                    "overrides, e.g. `gptforge train train.max_steps=500 model.n_layer=4`.")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides")
    p.add_argument("-c", "--config", help=f"TOML file or preset name (default: {DEFAULT_PRESET})")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its latest checkpoint, with its saved "
                        "config (overrides may change e.g. train.max_steps, not the model)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over even if train.out_dir already holds checkpoints")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as TOML and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gptforge.config.loader import override_keys
    from gptforge.train.launch import train
    from gptforge.train.pretraining import Pretraining

    cfg = resolve(args, DEFAULT_PRESET)
    if cfg is None:
        return 0
    stage = Pretraining(model_overrides=override_keys(args.overrides, "model"))
    return train(cfg, resume=bool(args.resume), overwrite=args.overwrite, stage=stage)


def resolve(args: argparse.Namespace, default_preset: str):
    """The config a training command runs (None after --print-config has printed it)."""
    from gptforge.errors import GptforgeError
    from gptforge.train.launch import resume_config

    if args.resume and args.config:
        raise GptforgeError("--resume uses the run's saved config; pass overrides instead of -c")
    if args.resume:
        cfg = resume_config(args.resume, args.overrides)
    else:
        cfg = load_config(args.config or default_preset, args.overrides)
    if args.print_config:
        print(to_toml(cfg), end="")
        return None
    return cfg
