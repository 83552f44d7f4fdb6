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
from gptforge.data.filters import SCRIPTS
from gptforge.data.sources import TEXT_UNITS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare", help="tokenize text files into training shards",
        description="Read documents, train or load a tokenizer, split train/val and write token "
                    "shards plus manifest.json into --out. See docs/data.md.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", action="extend", metavar="PATH",
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
    add_corpus_options(parser)
    parser.set_defaults(func=run)


def add_corpus_options(parser: argparse.ArgumentParser) -> None:
    """Options for the shape of the documents, sampling rates, quality filters and dry runs."""
    group = parser.add_argument_group("documents, sampling and filters (see docs/data.md)")
    group.add_argument("--template", metavar="TEXT",
                       help="render each JSON/Parquet record from several fields, e.g. "
                            "'{title}\n{author}\n{paragraphs}' (arrays joined by newlines, "
                            "a.b for nested fields; \n and \t are understood)")
    group.add_argument("--split", choices=TEXT_UNITS, default="file", dest="text_unit",
                       help="one document per .txt/.md file, per line, or per paragraph "
                            "(default: file)")
    group.add_argument("--input-rate", action="append", metavar="PATH=RATE",
                       help="take the documents of the --input item PATH RATE times: 0.5 half, "
                            "2 twice (seeded); repeat the option for several inputs")
    group.add_argument("--min-chars", type=int, metavar="N",
                       help="drop documents shorter than N characters")
    group.add_argument("--max-bad-char-share", type=float, metavar="F",
                       help="drop documents with more than this share of U+FFFD replacement or "
                            "control characters")
    group.add_argument("--max-punctuation-share", type=float, metavar="F",
                       help="drop documents whose visible characters are more than this share "
                            "punctuation")
    group.add_argument("--min-script-share", metavar="SCRIPT:F",
                       help=f"drop documents with less than share F of their letters in SCRIPT "
                            f"({', '.join(SCRIPTS)}), e.g. cjk:0.5")
    group.add_argument("--near-dedup", type=float, metavar="J",
                       help="drop near-duplicates: documents whose MinHash estimate of Jaccard "
                            "similarity to an earlier one is about J or more, e.g. 0.8")
    group.add_argument("--near-dedup-shingle", type=int, default=5, metavar="N",
                       help="characters per shingle for --near-dedup (default: 5)")
    group.add_argument("--near-dedup-perms", type=int, default=128, metavar="N",
                       help="MinHash functions for --near-dedup (default: 128)")
    group.add_argument("--dry-run", nargs="?", type=int, const=3, metavar="N",
                       help="write nothing: print the first N documents (default 3) as rendered "
                            "and what the filters and rates did")


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
        tokenizer_options=training_options(args) | foreign_options(args),
        **corpus_arguments(args))
    if manifest.get("dry_run"):
        print_preview(manifest)
        return 0
    print_summary(manifest, out)
    return 0


def corpus_arguments(args: argparse.Namespace) -> dict:
    """The keyword arguments of :func:`prepare` that :func:`add_corpus_options` sets."""
    from gptforge.data.filters import FilterSettings
    from gptforge.data.rendering import unescape

    filters = FilterSettings(
        min_chars=args.min_chars, max_bad_char_share=args.max_bad_char_share,
        max_punctuation_share=args.max_punctuation_share,
        min_script_share=args.min_script_share, near_dedup=args.near_dedup,
        near_dedup_shingle=args.near_dedup_shingle, near_dedup_perms=args.near_dedup_perms)
    return {"template": unescape(args.template) if args.template is not None else None,
            "text_unit": args.text_unit, "input_rates": args.input_rate, "filters": filters,
            "dry_run": args.dry_run is not None, "preview_documents": args.dry_run or 0}


def print_preview(preview: dict) -> None:
    """A dry run's samples, each cut short, then the counts."""
    for number, sample in enumerate(preview["samples"], start=1):
        more = sample["chars"] - len(sample["text"])
        print(f"--- document {number}: {sample['label']} ({sample['chars']:,} chars)")
        print(sample["text"] + (f"\n[... {more:,} more chars]" if more else ""))
    print(f"--- dry run: {preview['documents']:,} documents kept, {preview['taken']:,} taken "
          f"with the rates, {preview['chars']:,} chars; nothing written")
    print_corpus_report(preview)
    sys.stdout.flush()


def print_corpus_report(report: dict) -> None:
    """What each filter removed and what each rated source gave (manifest or dry run)."""
    filters = report.get("filters")
    if filters:
        for name, removed in filters["removed"].items():
            print(f"  filter {name:<22} removed {removed['documents']:>9,} of "
                  f"{filters['documents']:,} documents ({removed['share']:.1%})")
    for source in report.get("sampling") or []:
        print(f"  rate {source['rate']:g} on {source['source']}: {source['documents']:,} "
              f"documents -> {source['taken']:,}")


def print_summary(manifest: dict, out: Path) -> None:
    tok, stats = manifest["tokenizer"], manifest["stats"]
    print(f"prepared {out}  ({tok['kind']} tokenizer, vocab {tok['vocab_size']:,}, "
          f"{manifest['token_dtype']} tokens)")
    for name, split in manifest["splits"].items():
        shards = f"{split['shards']} shard{'' if split['shards'] == 1 else 's'}"
        print(f"  {name:<5} {split['tokens']:>14,} tokens  {split['documents']:>9,} documents  "
              f"{shards}")
    print_corpus_report(manifest)
    print(f"  {stats['bytes_per_token']:.2f} bytes/token; tokenizer {stats['tokenizer_s']:.1f} s, "
          f"encoding {stats['encode_s']:.1f} s ({stats['tokens_per_s']:,} tokens/s); "
          f"total {manifest['duration_s']:.1f} s")
    sys.stdout.flush()
