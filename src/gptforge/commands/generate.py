"""``gptforge generate``: continue a prompt with a trained model, streaming to the terminal.

With ``--interactive`` it is a completion loop: each line typed is appended to the story and the
model continues it; the story accumulates from turn to turn. Lines starting with ``/`` are
commands (see :func:`help_text`): change any sampling setting, show the story, or start over.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from gptforge.inference.sampling import add_sampling_options

# /NAME VALUE shortcuts whose NAME is not the field's own name (OpenAI's and llama.cpp's).
ALIASES = {"max_tokens": "max_new_tokens", "n_predict": "max_new_tokens"}


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a checkpoint or run directory")
    p.add_argument("checkpoint", metavar="CKPT_OR_RUN_DIR")
    p.add_argument("--prompt", default="", help="text to continue (default: start a document)")
    add_sampling_options(p, temperature=0.8)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--interactive", action="store_true",
                   help="a completion loop: type text, the model continues the story; /help "
                        "lists the commands (change settings, /show, /reset)")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step: 2-4.5x faster per token after a 20-30 s "
                        "one-off compilation (worth it for long outputs)")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="int8: weight-only int8 linear layers, about 4x smaller than float32 "
                        "(not with --compile)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import gptforge
    from gptforge.errors import GptforgeError
    from gptforge.inference.sampling import settings_from_args

    if args.num_samples < 1:
        raise GptforgeError("--num-samples must be >= 1")
    if args.interactive and args.num_samples != 1:
        raise GptforgeError("--interactive continues one story: leave out --num-samples")
    settings = settings_from_args(args)  # refused before anything is loaded
    generator = gptforge.load(args.checkpoint, device=args.device, compile=args.compile,
                              quantize=args.quantize)
    if args.interactive:
        return run_interactive(generator, settings, args.prompt)
    for i in range(args.num_samples):
        seed = None if settings.seed is None else settings.seed + i
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        sys.stdout.write(args.prompt)
        try:
            sample = dataclasses.replace(settings, seed=seed)
            for piece in generator.stream(args.prompt, **dataclasses.asdict(sample)):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:  # end the line, so "interrupted" and the shell prompt do not
            sys.stdout.write("\n")  # land after the text
            sys.stdout.flush()
            raise
        sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


def run_interactive(generator, settings, prompt: str) -> int:
    """The completion loop over standard input (a terminal or piped lines); 0 at /exit or EOF."""
    from gptforge.errors import GptforgeError
    from gptforge.inference.textgen import CompletionSession

    session = CompletionSession(generator, settings)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"continuing stories ({generator.model.config.block_size}-token context): type "
              "text, or an empty line to go on; /help for commands, /exit to quit")
    if prompt:
        print_continuation(session, prompt)
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: leave quietly
            if interactive:
                print()
            return 0
        if line.startswith("/"):
            if not run_command(session, line.strip()):
                return 0
            continue
        try:
            print_continuation(session, line)
        except GptforgeError as err:  # e.g. a character the tokenizer cannot encode
            print(f"error: {err}", file=sys.stderr)


def print_continuation(session, text: str) -> None:
    pieces = session.extend(text)  # raises here, before any output, if text cannot be encoded
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:  # Ctrl-C while generating: stop this turn, keep the story
        sys.stdout.write(" [interrupted]")
    sys.stdout.write("\n")
    sys.stdout.flush()


def run_command(session, line: str) -> bool:
    """Carry out a /command of the completion loop; False means quit."""
    from gptforge.errors import GptforgeError
    from gptforge.inference.sampling import replace_setting

    command, _, rest = line[1:].partition(" ")
    rest = rest.strip()
    if command in ("exit", "quit"):
        return False
    if command == "reset":
        session.reset()
        print("(story cleared)")
    elif command == "show":
        print(session.story if session.story else "(the story is empty)")
    elif command == "settings":
        print(", ".join(f"{k}={v}" for k, v in dataclasses.asdict(session.settings).items()))
    elif command == "help":
        print(help_text())
    elif command == "set" or command in ALIASES or command in dataclasses.asdict(session.settings):
        name, value = rest.partition("=")[::2] if command == "set" else (command, rest)
        name = ALIASES.get(name.strip(), name.strip())
        try:
            session.settings = replace_setting(session.settings, name, value.strip())
            print(f"({name} = {getattr(session.settings, name)})")
        except GptforgeError as err:
            print(f"error: {err}", file=sys.stderr)
    else:
        print(f"unknown command /{command}\n{help_text()}")
    return True


def help_text() -> str:
    from gptforge.inference.sampling import setting_fields

    names = ", ".join(setting_fields())
    return ("type text to append it to the story and let the model continue (an empty line: "
            "continue as is)\ncommands:\n"
            "  /NAME VALUE     change a sampling setting, e.g. /temperature 0, /top_k 40,\n"
            "                  /top_p 0.9, /max_tokens 100, /seed none\n"
            "  /set NAME=VALUE the same; NAME is one of: " + names + "\n"
            "  /settings       show the sampling settings\n"
            "  /show           show the story so far\n"
            "  /reset          start over with an empty story\n"
            "  /help           show this help\n"
            "  /exit           quit (so does end of input, Ctrl-D)")
