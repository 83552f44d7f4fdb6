"""``gptforge export``: a self-contained copy of a checkpoint (LoRA adapters merged in), as a
gptforge checkpoint or a Hugging Face ``transformers`` model directory."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


# The writers of gptforge.export.WRITERS, listed here so that `--help` does not import torch.
FORMATS = ("native", "huggingface")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a self-contained checkpoint (all weights, LoRA merged)")
    p.add_argument("checkpoint", metavar="CKPT_OR_RUN_DIR")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="directory to write (replaced if it holds an earlier export)")
    p.add_argument("--merge-lora", action="store_true",
                   help="fold LoRA adapters into the base weights (required for a LoRA checkpoint)")
    p.add_argument("--format", choices=FORMATS, default="native",
                   help="native: a gptforge checkpoint directory; huggingface: a transformers "
                        "model directory (GPT-2, Llama or Qwen3 layout) with tokenizer.json")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gptforge.checkpoints.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, merge_lora=args.merge_lora,
                            format=args.format)
    log.info("exported %s to %s", args.checkpoint, out)
    return 0
