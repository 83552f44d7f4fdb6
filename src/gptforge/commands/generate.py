"""``gptforge generate``: continue a prompt with a trained model, streaming to the terminal."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a checkpoint or run directory")
    p.add_argument("checkpoint", metavar="CKPT_OR_RUN_DIR")
    p.add_argument("--prompt", default="", help="text to continue (default: start a document)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    p.add_argument("--num-samples", type=int, default=1)
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

    if args.max_new_tokens < 0 or args.num_samples < 1:
        raise GptforgeError("--max-new-tokens must be >= 0, --num-samples >= 1")
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty)
    check_sampling(settings)
    generator = gptforge.load(args.checkpoint, device=args.device, compile=args.compile,
                              quantize=args.quantize)
    for i in range(args.num_samples):
        seed = None if args.seed is None else args.seed + i
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        sys.stdout.write(args.prompt)
        try:
            for piece in generator.stream(args.prompt, seed=seed, **settings):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:  # end the line, so "interrupted" and the shell prompt do not
            sys.stdout.write("\n")  # land after the text
            sys.stdout.flush()
            raise
        sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


def check_sampling(settings: dict) -> None:
    """Refuse nan, inf or a negative temperature (and the like) before anything is loaded, in
    the options' names: "--top-p must be a finite number, got nan"."""
    from gptforge.errors import GptforgeError
    from gptforge.inference.engine import SamplingSettings

    try:
        SamplingSettings(**settings)
    except GptforgeError as err:
        field, _, rest = str(err).partition(" ")  # each message starts with the field's name
        raise GptforgeError(f"--{field.replace('_', '-')} {rest}") from None
