"""``gptforge sft``, ``dpo`` and ``rl``: fine-tune a checkpoint on conversations, preferences
or rewarded rollouts.

Each is the training loop of ``gptforge train`` with another stage (see
:mod:`gptforge.train.finetune` and :mod:`gptforge.train.rl`); they take the same ``-c``,
``--resume``, ``--overwrite`` and ``section.key=value`` options, plus ``init_from=CHECKPOINT``.
"""

from __future__ import annotations

import argparse

PRESETS = {"sft": "sft", "dpo": "dpo", "rl": "rl"}
HELP = {"sft": "supervised fine-tuning on conversations (loss on assistant tokens only)",
        "dpo": "direct preference optimisation on chosen/rejected answer pairs",
        "rl": "reinforcement learning (GRPO) on prompts with a verifiable reward"}
DATA = {"sft": "finetune.data=data.jsonl", "dpo": "finetune.data=data.jsonl",
        "rl": "rl.data=prompts.jsonl rl.reward=exact"}


def register_stage(subparsers, kind: str) -> None:
    p = subparsers.add_parser(
        kind, help=HELP[kind],
        description=f"{HELP[kind][0].upper()}{HELP[kind][1:]}. Example: gptforge {kind} "
                    f"init_from=runs/base {DATA[kind]} [lora.rank=8]")
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
    from gptforge.train.rl import ReinforcementLearning

    cfg = resolve(args, PRESETS[kind])
    if cfg is None:
        return 0
    overrides = override_keys(args.overrides, "model")
    stage = ReinforcementLearning(model_overrides=overrides) if kind == "rl" \
        else STAGES[kind](model_overrides=overrides)
    return train(cfg, resume=bool(args.resume), overwrite=args.overwrite, stage=stage)
