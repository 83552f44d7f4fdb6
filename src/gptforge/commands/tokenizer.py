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
    add_training_options(train)
    train.add_argument("--text-field", default="text", metavar="NAME",
                       help="JSON field / Parquet column holding the text (default: text)")
    train.add_argument("--out", required=True, metavar="DIR", help="directory to save it in")
    train.set_defaults(func=run)
    imported = actions.add_parser(
        "import", help="adopt a tokenizer trained elsewhere, its ids unchanged",
        description="Load a Hugging Face tokenizer.json (with tokenizer_config.json beside it), a "
                    "SentencePiece .model or a tiktoken ranks file, map gptforge's roles onto its "
                    "special tokens, and save it into --out for `prepare --tokenizer DIR`.")
    imported.add_argument("path", metavar="PATH", help="the tokenizer file or its directory")
    imported.add_argument("--out", required=True, metavar="DIR", help="directory to save it in")
    add_foreign_options(imported)
    imported.set_defaults(func=run_import)


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """Options of training a bpe or sentencepiece tokenizer (``tokenizer train``, ``prepare``)."""
    group = parser.add_argument_group("tokenizer training")
    group.add_argument("--character-coverage", type=float, metavar="F",
                       help="sentencepiece: share of the text's characters kept as characters, "
                            "the rarest rest become byte tokens (default: 0.9995; lower it to "
                            "fit a small vocabulary on Chinese text)")
    group.add_argument("--split-digits", action="store_true",
                       help="bpe, sentencepiece: every digit is a token of its own")
    group.add_argument("--user-symbols", nargs="+", metavar="S",
                       help="bpe, sentencepiece: strings that are always one token")
    group.add_argument("--max-piece-length", type=int, metavar="N",
                       help="bpe, sentencepiece: longest token in characters (default: 16 for "
                            "sentencepiece, no limit for bpe)")
    group.add_argument("--nfkc", action="store_true",
                       help="bpe, sentencepiece: NFKC-normalise the text (full-width letters and "
                            "digits become ASCII); decoding then gives the normalised text")


def add_foreign_options(parser: argparse.ArgumentParser) -> None:
    """Options of loading a tokenizer trained elsewhere (``tokenizer import``, ``prepare``)."""
    group = parser.add_argument_group("a tokenizer trained elsewhere")
    group.add_argument("--eos-token", metavar="TOKEN",
                       help="its token that ends a document (default: <|endoftext|>, "
                            "<|end_of_text|>, </s>... whichever it has)")
    group.add_argument("--pad-token", metavar="TOKEN",
                       help="its padding token (default: its config's pad_token, else the "
                            "end-of-document token)")
    group.add_argument("--role-token", action="append", metavar="ROLE=TOKEN", default=[],
                       help="its token for a chat role: system, user, assistant or end (end of "
                            "turn, default: <|im_end|>, <|eot_id|>... whichever it has)")
    group.add_argument("--add-special-tokens", action="store_true",
                       help="append gptforge's special tokens for the roles none of its tokens "
                            "fill (only for a model trained from scratch: these ids are new)")
    group.add_argument("--tiktoken-pattern", choices=("gpt2", "cl100k", "llama3"),
                       help="pre-tokenizer regex of a tiktoken ranks file (default: the one its "
                            "size identifies, else gpt2, as gptforge's own bpe)")


def training_options(args: argparse.Namespace) -> dict:
    """The training options given on the command line, as ``train_tokenizer`` keywords."""
    given = {"character_coverage": args.character_coverage, "split_digits": args.split_digits,
             "user_symbols": args.user_symbols, "max_piece_length": args.max_piece_length,
             "nfkc": args.nfkc}
    return {name: value for name, value in given.items() if value not in (None, False)}


def foreign_options(args: argparse.Namespace) -> dict:
    """The foreign-tokenizer options given, as ``load_tokenizer`` keywords."""
    roles = {}
    for item in args.role_token:
        role, sep, token = item.partition("=")
        if not sep or not token:
            raise GptforgeError(f"--role-token {item}: expected ROLE=TOKEN, e.g. "
                                "--role-token end=<|im_end|>")
        roles[role] = token
    roles |= {role: token for role, token in (("eos", args.eos_token), ("pad", args.pad_token))
              if token is not None}
    options: dict = {"roles": roles} if roles else {}
    if args.add_special_tokens:
        options["add_special_tokens"] = True
    if args.tiktoken_pattern is not None:
        options["tiktoken_pattern"] = args.tiktoken_pattern
    return options


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
                                sp_model_type=args.sp_model_type, progress=sys.stderr.isatty(),
                                **training_options(args))
    paths = tokenizer.save(out)
    n_bytes, n_chars, n_tokens = _measure(tokenizer, iter_documents(inputs, args.text_field))
    print(f"saved {tokenizer.kind} tokenizer: {', '.join(str(p) for p in paths)}")
    print(f"  vocab size {tokenizer.vocab_size:,} (special tokens: "
          f"{', '.join(f'{t}={i}' for t, i in tokenizer.special_tokens.items())})")
    print(f"  training text: {n_bytes:,} bytes, {n_chars:,} chars -> {n_tokens:,} tokens")
    print(f"  compression: {n_bytes / max(n_tokens, 1):.2f} bytes/token, "
          f"{n_chars / max(n_tokens, 1):.2f} chars/token")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from gptforge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.path, **foreign_options(args))
    _check_out(Path(args.out), tokenizer.kind)
    paths = tokenizer.save(Path(args.out))
    print(f"saved {tokenizer.kind} tokenizer: {', '.join(str(p) for p in paths)}")
    roles = ", ".join(f"{role}={token} (id {tokenizer.token_id(token)})"
                      for role, token in tokenizer.roles.items())
    print(f"  vocab size {tokenizer.vocab_size:,}; roles: {roles}")
    if tokenizer.added_tokens:
        print(f"  added after id {tokenizer.vocab_size - len(tokenizer.added_tokens) - 1}: "
              f"{', '.join(tokenizer.added_tokens)}")
    return 0


def _check_out(out: Path, kind: str) -> None:
    """Refuse to put a second kind of tokenizer next to another: loading the directory would be
    ambiguous."""
    from gptforge.tokenizer.base import DESCRIPTOR_FILE, KIND_FILES

    if kind in KIND_FILES:  # gptforge's own: one file, which a foreign descriptor would shadow
        others = [name for k, name in KIND_FILES.items() if k != kind and (out / name).exists()]
        others += [DESCRIPTOR_FILE] if (out / DESCRIPTOR_FILE).exists() else []
    else:  # foreign: its files and descriptor, which may replace an earlier foreign one
        others = [] if (out / DESCRIPTOR_FILE).exists() else \
            [name for name in KIND_FILES.values() if (out / name).exists()]
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
