"""``gptforge tokenizer train``: train a tokenizer alone, to inspect it or share it across datasets.

``gptforge prepare`` trains one itself when given a kind; this command is for when the tokenizer is
an artefact of its own: trained once on a broad corpus, then passed to several ``prepare`` runs
as ``--tokenizer DIR``. It reports the compression achieved, the number that decides how much text
a context window holds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gptforge.data.corpora import CORPORA
from gptforge.errors import GptforgeError
from gptforge.tokenizer.base import KINDS

_BATCH_DOCUMENTS = 256


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tokenizer", help="train a tokenizer",
                                   description="Tokenizer tools.")
    actions = parser.add_subparsers(dest="tokenizer_action", metavar="ACTION", required=True)
    train = actions.add_parser(
        "train", help="train a tokenizer on text files and save it",
        description="Train a tokenizer on all documents of the inputs and save it into --out; "
                    "prints its vocabulary size and compression on the training text.")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="PATH",
                        help="files, directories or globs: .txt .md .jsonl .json .parquet")
    source.add_argument("--corpus", choices=sorted(CORPORA), help="a built-in corpus")
    train.add_argument("--kind", required=True, choices=KINDS, help="tokenizer backend")
    train.add_argument("--vocab-size", type=int, metavar="N",
                       help="vocabulary size (default: char natural, else 4096)")
    train.add_argument("--sp-model-type", choices=("bpe", "unigram"), default="bpe",
                       help="SentencePiece model type (default: bpe)")
    train.add_argument("--text-field", default="text", metavar="NAME",
                       help="JSON field / Parquet column holding the text (default: text)")
    train.add_argument("--out", required=True, metavar="DIR", help="directory to save it in")
    train.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gptforge.data.corpora import fetch_corpus
    from gptforge.data.sources import iter_documents, resolve_inputs
    from gptforge.tokenizer import train_tokenizer

    inputs = [str(p) for p in fetch_corpus(args.corpus)] if args.corpus else args.input
    hf_inputs = [i for i in inputs if i.startswith("hf:")]
    if hf_inputs:
        raise GptforgeError(f"--input {hf_inputs[0]}: `gptforge tokenizer train` reads files; "
                            "for a Hugging Face dataset use `gptforge prepare --input "
                            f"{hf_inputs[0]} --tokenizer KIND`, which trains the tokenizer too")
    inputs = [str(p) for p in resolve_inputs(inputs)]  # input errors before any training
    out = Path(args.out)
    _check_out(out, args.kind)
    texts = (text for _, text in iter_documents(inputs, args.text_field))
    tokenizer = train_tokenizer(args.kind, texts, args.vocab_size,
                                sp_model_type=args.sp_model_type, progress=sys.stderr.isatty())
    paths = tokenizer.save(out)
    n_bytes, n_chars, n_tokens = _measure(tokenizer, iter_documents(inputs, args.text_field))
    print(f"saved {tokenizer.kind} tokenizer: {', '.join(str(p) for p in paths)}")
    print(f"  vocab size {tokenizer.vocab_size:,} (special tokens: "
          f"{', '.join(f'{t}={i}' for t, i in tokenizer.special_tokens.items())})")
    print(f"  training text: {n_bytes:,} bytes, {n_chars:,} chars -> {n_tokens:,} tokens")
    print(f"  compression: {n_bytes / max(n_tokens, 1):.2f} bytes/token, "
          f"{n_chars / max(n_tokens, 1):.2f} chars/token")
    return 0


def _check_out(out: Path, kind: str) -> None:
    """Refuse to put a second kind of tokenizer next to another: loading the directory would be
    ambiguous."""
    from gptforge.tokenizer.base import KIND_FILES

    others = [name for k, name in KIND_FILES.items() if k != kind and (out / name).exists()]
    if out.exists() and not out.is_dir():
        raise GptforgeError(f"--out {out} is a file, not a directory")
    existing = next(p for p in out.absolute().parents if p.exists())  # what save() builds on
    if not existing.is_dir():
        raise GptforgeError(f"--out {out}: {existing} is a file, not a directory")
    if others:
        raise GptforgeError(f"--out {out} already holds {', '.join(others)}; a directory holds one "
                            "tokenizer, so choose another --out")


def _measure(tokenizer, documents) -> tuple[int, int, int]:
    """UTF-8 bytes, characters and tokens of the documents, encoded in batches."""
    n_bytes = n_chars = n_tokens = 0
    batch: list[str] = []
    for _, text in documents:
        batch.append(text)
        n_bytes += len(text.encode())
        n_chars += len(text)
        if len(batch) == _BATCH_DOCUMENTS:
            n_tokens += sum(map(len, tokenizer.encode_batch(batch)))
            batch = []
    n_tokens += sum(map(len, tokenizer.encode_batch(batch)))
    return n_bytes, n_chars, n_tokens
