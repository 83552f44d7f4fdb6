"""``gptforge chat``: talk to a fine-tuned model, one line per message, replies streamed.

Reads standard input line by line, so it works in a terminal and with piped input alike. Lines
starting with ``/`` are commands (see ``HELP``); ``/exit`` or end of input quits.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from gptforge.inference.sampling import add_sampling_options

log = logging.getLogger(__name__)

HELP = """commands:
  /reset        forget the conversation (the system message stays)
  /history      show the conversation so far
  /system TEXT  set the system message (no TEXT: remove it)
  /help         show this help
  /exit         quit (so does end of input, Ctrl-D)"""


def register(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat with a (fine-tuned) checkpoint in the terminal")
    p.add_argument("checkpoint", metavar="CKPT_OR_RUN_DIR")
    p.add_argument("--system", default=None, metavar="TEXT", help="system message")
    # --max-new-tokens "automatic": 256 or half the context, if smaller (inference/chat.py).
    add_sampling_options(p, temperature=0.8, max_new_tokens=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step: faster replies after a 20-30 s one-off "
                        "compilation (see `gptforge generate --compile`)")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="int8: weight-only int8 linear layers, about 4x smaller than float32 "
                        "(not with --compile)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import gptforge
    from gptforge.errors import GptforgeError
    from gptforge.inference.chat import ChatSession
    from gptforge.inference.sampling import settings_from_args

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise GptforgeError("--max-new-tokens must be >= 1")
    sampling = dataclasses.asdict(settings_from_args(args))  # refused before loading
    sampling["max_new_tokens"] = args.max_new_tokens  # None: the session's default
    warn_if_not_chat_tuned(args.checkpoint)
    generator = gptforge.load(args.checkpoint, device=args.device, compile=args.compile,
                              quantize=args.quantize)
    session = ChatSession(generator, system=args.system, **sampling)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.checkpoint} ({generator.model.config.block_size}-token "
              "context); /help for commands, /exit to quit")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:  # Ctrl-C at the prompt: leave quietly
            print()
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not run_command(session, line):
                break
            continue
        try:
            print_reply(session, line)
        except GptforgeError as err:  # e.g. a character the tokenizer cannot encode
            print(f"error: {err}", file=sys.stderr)
    return 0


def warn_if_not_chat_tuned(path: str) -> None:
    """Say so when the checkpoint never went through SFT or DPO (its model.json has no
    ``fine_tuned`` or LoRA entry): such a model continues the conversation's text as a document
    instead of answering, which looks like a bug when nothing says why."""
    from gptforge.checkpoints.format import is_fine_tuned, read_meta, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    if not is_fine_tuned(meta):
        log.warning("warning: %s has not been fine-tuned for chat (it was only pretrained), so its "
                    "replies may just continue the text; fine-tune it first with gptforge sft "
                    "(docs/lora_and_chat.md)", ckpt)


def print_reply(session, text: str) -> None:
    """Stream the reply; reasoning (between <think> and </think>) on its own ``thinking>`` line,
    the answer after ``assistant>``, tool calls last (docs/chat_format.md)."""
    from gptforge.inference.reply import ReplySplitter

    pieces = session.reply(text)  # raises here, before any output, if text cannot be encoded
    splitter, shown = ReplySplitter(), None
    try:
        for piece in pieces:
            for kind, part in splitter.feed(piece):
                shown = _write_part(kind, part, shown)
        rest, calls = splitter.finish()
        for kind, part in rest:
            shown = _write_part(kind, part, shown)
        if shown is None:
            sys.stdout.write("assistant> ")
        for call in calls:
            function = call["function"]
            sys.stdout.write(f"\ntool call> {function['name']}({function['arguments']})")
    except KeyboardInterrupt:  # Ctrl-C while answering: stop this reply, keep chatting
        sys.stdout.write(" [interrupted]")
    sys.stdout.write("\n")
    sys.stdout.flush()


def _write_part(kind: str, text: str, shown: str | None) -> str:
    """Write ``text`` of ``kind``, opening its line when the kind changes; the kind shown."""
    if not text:
        return shown
    if kind != shown:
        label = "thinking> " if kind == "reasoning" else "assistant> "
        sys.stdout.write(("\n" if shown else "") + label)
    sys.stdout.write(text)
    sys.stdout.flush()
    return kind


def run_command(session, line: str) -> bool:
    """Carry out a /command; False means quit."""
    command, _, rest = line.partition(" ")
    rest = rest.strip()
    if command in ("/exit", "/quit"):
        return False
    if command == "/reset":
        session.reset()
        print("(conversation cleared)")
    elif command == "/history":
        print_history(session)
    elif command == "/system":
        session.system = rest or None
        print("(system message set)" if rest else "(system message removed)")
    elif command == "/help":
        print(HELP)
    else:
        print(f"unknown command {command}\n{HELP}")
    return True


def print_history(session) -> None:
    messages = session.messages()
    for message in messages:
        if message.get("reasoning"):
            print(f"[{message['role']} thinking] {message['reasoning']}")
        print(f"[{message['role']}] {message['content']}")
    if not session.history:
        print("(no turns yet)")
