"""``gptforge eval``: score a checkpoint on held-out text and on multiple-choice tasks.

Language modelling (``--data`` prepared shards or ``--text`` raw documents): loss, perplexity and
bits per byte (``gptforge.eval.lm``). Multiple choice (``--task``): acc and acc_norm
(``gptforge.eval.multiple_choice``). Inputs are read and checked before the model is loaded, so a
mistake costs no waiting. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

# The keys of gptforge.eval.tasks.CONVERTERS, listed here so that `--help` does not import torch.
TASK_FORMATS = ("mc", "hellaswag", "arc", "piqa")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="score a checkpoint: loss, perplexity, bits per byte, multiple choice",
        description="Evaluate a checkpoint on held-out text (--data or --text) and/or a "
                    "multiple-choice task (--task). See docs/evaluation.md.")
    p.add_argument("checkpoint", metavar="CKPT_OR_RUN_DIR")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--data", metavar="DIR",
                      help="a prepared data directory, encoded with the checkpoint's tokenizer")
    text.add_argument("--text", nargs="+", metavar="PATH",
                      help="raw documents (files, directories, globs: .txt .md .jsonl .json "
                           ".parquet; or hf:NAME[:CONFIG][@SPLIT]), encoded with the "
                           "checkpoint's tokenizer")
    p.add_argument("--split", default="val", help="split of --data to score (default: val)")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="JSON field / Parquet column of --text documents (default: text)")
    p.add_argument("--stride", type=int, metavar="N",
                   help="start a window every N tokens and score only its last N tokens, so "
                        "each has at least block_size - N tokens of context (default: "
                        "block_size, non-overlapping windows)")
    p.add_argument("--max-tokens", type=int, metavar="N",
                   help="score at most N tokens (default: all)")
    p.add_argument("--task", metavar="FILE.jsonl|hf:NAME@SPLIT",
                   help="a multiple-choice task: JSONL records {context, choices, label}, or "
                        "a dataset read with --task-format")
    p.add_argument("--task-format", choices=TASK_FORMATS, default="mc",
                   help="field layout of --task records (default: mc)")
    p.add_argument("--max-examples", type=int, metavar="N",
                   help="score only the first N examples of --task")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="sequences per forward pass (default: 8)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="autocast precision (default: bfloat16 where the device has it natively)")
    p.add_argument("--out", metavar="FILE.json", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gptforge import atomic
    from gptforge.checkpoints.format import model_config_of, read_meta, resolve_checkpoint
    from gptforge.checkpoints.loading import build_model
    from gptforge.errors import GptforgeError
    from gptforge.eval import report
    from gptforge.runtime.device import resolve_device, resolve_precision
    from gptforge.tokenizer import load_tokenizer

    _check_numbers(args)
    if not (args.data or args.text or args.task):
        raise GptforgeError("nothing to evaluate: give --data DIR or --text FILE... (language "
                            "modelling) and/or --task FILE.jsonl (multiple choice)")
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise GptforgeError(f"--out {out} is a directory; name a file, e.g. {out}/results.json")
    ckpt = resolve_checkpoint(args.checkpoint)
    meta = read_meta(ckpt)
    block_size = model_config_of(meta, ckpt).block_size
    if args.stride is not None and args.stride > block_size:
        raise GptforgeError(f"--stride {args.stride} is larger than the model's block_size "
                            f"{block_size}; use a stride from 1 to {block_size}")
    tokenizer = load_tokenizer(ckpt / "tokenizer")
    stream = _lm_stream(args, tokenizer)
    examples = _task_examples(args)
    precision = resolve_precision(resolve_device(args.device), args.dtype)
    model = build_model(ckpt).to(precision.device)
    progress = not args.no_progress and sys.stderr.isatty()
    results = report.header(ckpt, meta, model, precision)
    started = time.perf_counter()
    if stream is not None:
        results["lm"] = _evaluate_lm(args, model, tokenizer, stream, precision, progress)
    if examples is not None:
        results["task"] = _evaluate_task(args, model, tokenizer, examples, precision, progress)
    results["seconds"] = round(time.perf_counter() - started, 3)
    print(report.format_table(results))
    if out is not None:
        try:
            atomic.write_text(out, json.dumps(results, indent=2) + "\n")
        except OSError as err:
            raise GptforgeError(f"--out {out}: cannot write ({err.strerror or err})") from None
        log.info("results written to %s", out)
    return 0


def _check_numbers(args: argparse.Namespace) -> None:
    from gptforge.errors import GptforgeError

    for flag in ("stride", "max_tokens", "max_examples", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise GptforgeError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")


def _lm_stream(args: argparse.Namespace, tokenizer):
    from gptforge.data.sources import iter_documents
    from gptforge.eval.lm import prepared_stream, text_stream

    if args.data:
        return prepared_stream(args.data, args.split, tokenizer)
    if args.text:
        documents = iter_documents(args.text, args.text_field)
        return text_stream(tokenizer, documents, args.max_tokens)
    return None


def _task_examples(args: argparse.Namespace):
    from gptforge.eval.tasks import read_task

    if not args.task:
        return None
    return read_task(args.task, args.task_format, args.max_examples)


def _evaluate_lm(args, model, tokenizer, stream, precision, progress: bool) -> dict:
    from gptforge.eval.lm import evaluate_stream

    started = time.perf_counter()
    result = evaluate_stream(model, tokenizer, stream, precision=precision, stride=args.stride,
                             batch_size=args.batch_size, max_tokens=args.max_tokens,
                             progress=progress)
    source = {"data": args.data, "split": args.split} if args.data else {"text": args.text}
    return {**source, **result.to_dict(), "seconds": round(time.perf_counter() - started, 3)}


def _evaluate_task(args, model, tokenizer, examples, precision, progress: bool) -> dict:
    from gptforge.eval.multiple_choice import evaluate_examples

    started = time.perf_counter()
    result = evaluate_examples(model, tokenizer, examples, precision=precision,
                               batch_size=args.batch_size, progress=progress)
    return {"task": args.task, "format": args.task_format, **result.to_dict(),
            "seconds": round(time.perf_counter() - started, 3)}
