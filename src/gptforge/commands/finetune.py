"""``gptforge sft`` and ``gptforge dpo``: fine-tune a checkpoint on conversations or preferences.

Both are the training loop of ``gptforge train`` with another stage (see
:mod:`gptforge.train.finetune`); they take the same ``-c``, ``--resume``, ``--overwrite`` and
``section.key=value`` options, plus ``init_from=CHECKPOINT``.
"""

from __future__ import annotations

import argparse

PRESETS = {"sft": "sft", "dpo": "dpo"}
HELP = {"sft": "supervised fine-tuning on conversations (loss on assistant tokens only)",
        "dpo": "direct preference optimisation on chosen/rejected answer pairs"}


def register_stage(subparsers, kind: str) -> None:
    p = subparsers.add_parser(
        kind, help=HELP[kind],
        description=f"{HELP[kind].capitalize()}. Example: gptforge {kind} "
                    f"init_from=runs/base finetune.data=data.jsonl [lora.rank=8]")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, and init_from=CHECKPOINT")
    p.add_argument("-c", "--config", help=f"TOML file or preset name (default: {PRESETS[kind]})")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start over even if train.out_dir already holds checkpoints")
    p.add_argument("--print-config", action="store_true", help="print the resolved config")
    p.set_defaults(func=lambda args: run(args, kind))


def run(args: argparse.Namespace, kind: str) -> int:
    from gptforge.commands.train import resolve
    from gptforge.config.loader import override_keys
    from gptforge.train.finetune import STAGES
    from gptforge.train.launch import train

    cfg = resolve(args, PRESETS[kind])
    if cfg is None:
        return 0
    stage = STAGES[kind](model_overrides=override_keys(args.overrides, "model"))
    return train(cfg, resume=bool(args.resume), overwrite=args.overwrite, stage=stage)
