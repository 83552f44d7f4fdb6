"""The ``gptforge`` console script.

Each subcommand lives in its own module under :mod:`gptforge.commands` and exposes two functions:
``register(subparsers)`` adds its argument parser, ``run(args) -> int`` does the work. This module
only wires them together, sets up logging, and turns a :class:`GptforgeError` into one line on
stderr with a non-zero exit (the traceback is shown only with ``--debug``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from gptforge.errors import GptforgeError

# Order is the order shown in ``gptforge --help``.
COMMANDS = ("prepare", "tokenizer", "train", "sft", "dpo", "rl", "generate", "chat",
            "serve", "eval", "report", "export", "import", "plot", "sweep", "plan")
MODULES = {"import": "import_hf"}  # a command whose module name differs ("import": a keyword)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptforge",
        description="Train GPT-style language models from scratch and put them to use.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"gptforge.commands.{MODULES.get(name, name)}")
        module.register(subparsers)
    return parser


class ProgressAwareHandler(logging.StreamHandler):
    """Log records written through ``tqdm.write``: while a progress bar is on screen, it is
    cleared, the line printed, and the bar drawn again below it, so lines never land on the bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm  # here, not at the top: `gptforge --help` stays fast

        try:
            tqdm.write(self.format(record), file=self.stream)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot take positionals after an option (`train --overwrite a.b=1`): collect them.
    if extra and hasattr(args, "overrides") and all("=" in e for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(message)s",
        handlers=[ProgressAwareHandler(sys.stderr)],
    )
    try:
        return int(args.func(args) or 0)
    except GptforgeError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped (`| head`): not an error
        # Python would report the failed flush of stdout at exit; point it at nothing instead.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports it


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
