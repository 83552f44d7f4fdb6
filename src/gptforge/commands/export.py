"""``gptforge export``: a self-contained copy of a checkpoint (LoRA adapters merged in), as a
gptforge checkpoint, a Hugging Face ``transformers`` model directory or a GGUF file (llama.cpp,
Ollama)."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


# The writers of gptforge.checkpoints.export.WRITERS, listed so that `--help` needs no torch.
FORMATS = ("native", "huggingface", "gguf")
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")  # gptforge.checkpoints.gguf.DTYPES


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a self-contained checkpoint (all weights, LoRA merged)")
    p.add_argument("checkpoint", metavar="CKPT_OR_RUN_DIR")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="directory to write (replaced if it holds an earlier export); for "
                        "--format gguf the file to write (e.g. model.gguf)")
    p.add_argument("--merge-lora", action="store_true",
                   help="fold LoRA adapters into the base weights (required for a LoRA checkpoint)")
    p.add_argument("--format", choices=FORMATS, default="native",
                   help="native: a gptforge checkpoint directory; huggingface: a transformers "
                        "model directory (GPT-2, Llama or Qwen3 layout) with tokenizer.json; "
                        "gguf: one file for llama.cpp and Ollama")
    p.add_argument("--dtype", choices=GGUF_DTYPES, default=None,
                   help="gguf only: weight type (default f16; q8_0 = 8-bit blocks)")
    p.add_argument("--ollama", action="store_true",
                   help="gguf only: also write an Ollama Modelfile next to the file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gptforge.checkpoints.export import export_checkpoint
    from gptforge.errors import GptforgeError

    options = {}
    if args.format == "gguf":
        options = {"dtype": args.dtype or "f16", "ollama": args.ollama}
    elif args.dtype is not None or args.ollama:
        raise GptforgeError("--dtype and --ollama apply to --format gguf only")
    out = export_checkpoint(args.checkpoint, args.out, merge_lora=args.merge_lora,
                            format=args.format, **options)
    log.info("exported %s to %s", args.checkpoint, out)
    return 0
