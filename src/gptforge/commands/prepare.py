"""``gptforge prepare``: tokenize a corpus into a data directory that ``gptforge train`` reads.

A thin shell over :func:`gptforge.data.prepare.prepare`; the options map one to one onto its
arguments (``--restart`` is ``resume=False``). Imports of the data pipeline happen in :func:`run`
so ``gptforge --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gptforge.commands.tokenizer import (
    add_foreign_options,
    add_training_options,
    foreign_options,
    training_options,
)
from gptforge.data.corpora import CORPORA


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare", help="tokenize text files into training shards",
        description="Read documents, train or load a tokenizer, split train/val and write token "
                    "shards plus manifest.json into --out. See docs/data.md.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="PATH",
                        help="files, directories or globs (.txt .md .jsonl .json .parquet), or "
                             "Hugging Face datasets: hf:NAME[:CONFIG][@SPLIT]")
    source.add_argument("--corpus", choices=sorted(CORPORA),
                        help="a built-in corpus, downloaded on first use")
    parser.add_argument("--tokenizer", required=True, metavar="{char,bpe,sentencepiece,PATH}",
                        help="train this kind of tokenizer on the corpus, or load a saved one: "
                             "gptforge's, a Hugging Face tokenizer.json, a SentencePiece .model "
                             "or a tiktoken ranks file")
    parser.add_argument("--vocab-size", type=int, metavar="N",
                        help="vocabulary size when training (default: char natural, else 4096)")
    parser.add_argument("--out", required=True, metavar="DIR", help="data directory to write")
    parser.add_argument("--text-field", default="text", metavar="NAME",
                        help="JSON field / Parquet column holding the text (default: text)")
    parser.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                        help="share of the text for the val split, 0 for none (default: 0.1)")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the train/val split")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="encoding processes (default: one per CPU, fewer for small inputs)")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, metavar="N",
                        help="tokens per shard file (default: 100000000)")
    parser.add_argument("--token-dtype", choices=("auto", "uint16", "uint32"), default="auto",
                        help="id width in the shards (default: uint16 if the vocab fits)")
    parser.add_argument("--sp-model-type", choices=("bpe", "unigram"), default="bpe",
                        help="SentencePiece model type (default: bpe)")
    # Tokenizer options: training one (--tokenizer KIND) or adopting one trained elsewhere.
    add_training_options(parser)
    add_foreign_options(parser)
    parser.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=True,
                        help="drop documents identical to an earlier one (default: on)")
    parser.add_argument("--restart", action="store_true",
                        help="discard the work an interrupted run left in OUT.partial instead "
                             "of continuing it")
    parser.add_argument("--hf-data-files", nargs="+", metavar="PATH",
                        help="local files for an hf: file loader, e.g. --input hf:json "
                             "--hf-data-files 'data/*.jsonl'")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gptforge.data.corpora import fetch_corpus
    from gptforge.data.prepare import prepare

    inputs = [str(p) for p in fetch_corpus(args.corpus)] if args.corpus else args.input
    out = Path(args.out)
    manifest = prepare(
        inputs, out, args.tokenizer, args.vocab_size, text_field=args.text_field,
        val_fraction=args.val_fraction, seed=args.seed, workers=args.workers,
        shard_tokens=args.shard_tokens, token_dtype=args.token_dtype,
        sp_model_type=args.sp_model_type, progress=not args.no_progress, corpus=args.corpus,
        dedup=args.dedup, resume=not args.restart, hf_data_files=args.hf_data_files,
        tokenizer_options=training_options(args) | foreign_options(args))
    print_summary(manifest, out)
    return 0


def print_summary(manifest: dict, out: Path) -> None:
    tok, stats = manifest["tokenizer"], manifest["stats"]
    print(f"prepared {out}  ({tok['kind']} tokenizer, vocab {tok['vocab_size']:,}, "
          f"{manifest['token_dtype']} tokens)")
    for name, split in manifest["splits"].items():
        shards = f"{split['shards']} shard{'' if split['shards'] == 1 else 's'}"
        print(f"  {name:<5} {split['tokens']:>14,} tokens  {split['documents']:>9,} documents  "
              f"{shards}")
    removed = manifest.get("dedup", {}).get("duplicates_removed")
    if removed is not None:
        print(f"  {removed:,} duplicate document{'' if removed == 1 else 's'} removed")
    print(f"  {stats['bytes_per_token']:.2f} bytes/token; tokenizer {stats['tokenizer_s']:.1f} s, "
          f"encoding {stats['encode_s']:.1f} s ({stats['tokens_per_s']:,} tokens/s); "
          f"total {manifest['duration_s']:.1f} s")
    sys.stdout.flush()
