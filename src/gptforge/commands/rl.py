"""``gptforge rl``: see :mod:`gptforge.commands.finetune`."""

from gptforge.commands.finetune import register_stage


def register(subparsers) -> None:
    register_stage(subparsers, "rl")
