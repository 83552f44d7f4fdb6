"""``gptforge import``: a Hugging Face ``transformers`` model directory (GPT-2, Llama, Qwen3,
Mixtral) as a gptforge checkpoint, its tokenizer with it (see ``checkpoints/hf_import.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "import", help="turn a Hugging Face transformers model directory into a checkpoint",
        description="Import a transformers checkpoint directory (config.json, safetensors or "
                    "pytorch_model.bin, tokenizer.json) of a GPT-2, Llama, Qwen3 or Mixtral "
                    "model. Example: gptforge import ~/models/qwen3-0.6b --out ckpts/qwen3 "
                    "--block-size 1024")
    p.add_argument("hf_dir", metavar="HF_DIR")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    p.add_argument("--block-size", type=int, default=0, metavar="N",
                   help="context length of the imported model (default: the model's "
                        "max_position_embeddings); shorter saves memory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gptforge.checkpoints.hf_import import import_huggingface
    from gptforge.errors import GptforgeError

    out = Path(args.out)
    if args.block_size < 0:
        raise GptforgeError("--block-size must be positive (0 = the model's own context)")
    if out.is_file():
        raise GptforgeError(f"--out {out} is a file; give a directory path")
    if out.is_dir() and any(out.iterdir()) and not (out / "model.json").is_file():
        raise GptforgeError(f"--out {out} is a non-empty directory that is not a checkpoint; "
                            "choose a new or empty directory")
    import_huggingface(args.hf_dir, out, block_size=args.block_size)
    print(f"imported {args.hf_dir} into {out}")
    return 0
