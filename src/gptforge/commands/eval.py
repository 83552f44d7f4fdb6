"""``gptforge eval``: score a checkpoint on held-out text, multiple-choice and generative tasks.

Language modelling (``--data`` prepared shards or ``--text`` raw documents): loss, perplexity and
bits per byte (``gptforge.eval.lm``). Multiple choice and letter-scored exams (``--task``): acc
and acc_norm (``gptforge.eval.multiple_choice``, ``exams``). Generative tasks (``--task-format
gsm8k|generate``): exact match, pass@k and text metrics (``gptforge.eval.generative``). Several
``--task`` options score several tasks; ``--bench core`` adds their CORE-style aggregate
(``gptforge.eval.core``). Inputs are read and checked before the model is loaded, so a mistake
costs no waiting. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

# gptforge.eval.tasks.TASK_FORMATS, listed here so that `--help` does not import torch.
TASK_FORMATS = ("mc", "hellaswag", "arc", "piqa", "mmlu", "ceval", "cmmlu", "generate", "gsm8k")
GENERATIVE_FORMATS = ("generate", "gsm8k")
# Generation options: (flag, the value that means "not given").
GENERATION_FLAGS = (("chat", False), ("num_samples", None), ("pass_k", None),
                    ("temperature", None), ("max_new_tokens", None), ("stop", None),
                    ("extract", None), ("fewshot_from", None))
GSM8K_STOPS = ("Question:", "\n\n")  # the next few-shot block would begin


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
    p.add_argument("--task", action="append", metavar="FILE|DIR|hf:NAME@SPLIT",
                   help="a task: JSONL records, a benchmark folder (mmlu, ceval, cmmlu) or a "
                        "dataset, read with --task-format; repeat to score several")
    p.add_argument("--task-format", action="append", choices=TASK_FORMATS, metavar="FORMAT",
                   help=f"field layout of --task ({', '.join(TASK_FORMATS)}; default: mc); one "
                        "for all tasks, or one per --task in order")
    p.add_argument("--task-split", metavar="NAME",
                   help="split of an exam folder to score (default: test; ceval: val)")
    p.add_argument("--shots", type=int, default=0, metavar="N",
                   help="few-shot examples before each question: exams take them from the dev "
                        "split, gsm8k from train.jsonl beside the task (default: 0)")
    p.add_argument("--fewshot-from", metavar="FILE.jsonl",
                   help="generative tasks: take the --shots examples from this file")
    p.add_argument("--max-examples", type=int, metavar="N",
                   help="score only the first N examples of each --task")
    p.add_argument("--bench", choices=("core",),
                   help="core: also report the CORE-style aggregate of the tasks (centred "
                        "accuracy averaged over tasks)")
    gen = p.add_argument_group("generative tasks (--task-format gsm8k or generate)")
    gen.add_argument("--chat", action="store_true",
                     help="ask as a user turn of the model's chat template (chat models)")
    gen.add_argument("--num-samples", type=int, metavar="N",
                     help="answers sampled per question, for pass@k (default: 1)")
    gen.add_argument("--pass-k", type=int, action="append", metavar="K",
                     help="report pass@K (at most --num-samples); repeat for several")
    gen.add_argument("--temperature", type=float, metavar="T",
                     help="sampling temperature (default: 0, greedy, for one sample; 0.8 for "
                          "several)")
    gen.add_argument("--max-new-tokens", type=int, metavar="N",
                     help="tokens generated at most per answer (default: 256, or half the "
                          "context if smaller)")
    gen.add_argument("--stop", action="append", metavar="TEXT",
                     help="end an answer at this text, \\n for a newline (repeatable; gsm8k "
                          "default: 'Question:' and a blank line)")
    gen.add_argument("--extract", choices=("number", "text"),
                     help="compare the final number (gsm8k default) or the whole normalised "
                          "text (generate default)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
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
    pairs = _task_formats(args)
    generation = _generation_settings(args, pairs, block_size)
    tokenizer = load_tokenizer(ckpt / "tokenizer")
    stream = _lm_stream(args, tokenizer)
    tasks = _load_tasks(args, pairs)
    precision = resolve_precision(resolve_device(args.device), args.dtype)
    model = build_model(ckpt).to(precision.device).eval()
    progress = not args.no_progress and sys.stderr.isatty()
    results = report.header(ckpt, meta, model, precision)
    started = time.perf_counter()
    if stream is not None:
        results["lm"] = _evaluate_lm(args, model, tokenizer, stream, precision, progress)
    scored = [_evaluate_task(args, model, tokenizer, task, generation, precision, progress)
              for task in tasks]
    _put_tasks(args, results, scored)
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

    for flag in ("stride", "max_tokens", "max_examples", "batch_size", "num_samples",
                 "max_new_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise GptforgeError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.shots < 0:
        raise GptforgeError(f"--shots must be 0 or more, got {args.shots}")
    if args.temperature is not None and args.temperature < 0:
        raise GptforgeError(f"--temperature must be 0 (greedy) or more, got {args.temperature}")


def _task_formats(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``(task, format)`` pairs: one --task-format for every --task, or one per --task."""
    from gptforge.errors import GptforgeError

    tasks, formats = args.task or [], args.task_format or ["mc"]
    if formats and not tasks and args.task_format:
        raise GptforgeError("--task-format without --task: name the task file or folder")
    if len(formats) == 1:
        formats = formats * len(tasks)
    if len(formats) != len(tasks):
        raise GptforgeError(f"{len(tasks)} --task options but {len(formats)} --task-format; "
                            "give one format for all tasks or one per task, in the same order")
    pairs = list(zip(tasks, formats))
    if args.bench == "core" and not pairs:
        raise GptforgeError("--bench core averages over the tasks given with --task; give some")
    if args.task_split and not any(f in ("mmlu", "ceval", "cmmlu") for _, f in pairs):
        raise GptforgeError("--task-split applies to the exam formats (mmlu, ceval, cmmlu)")
    return pairs


def _generation_settings(args: argparse.Namespace, pairs, block_size: int):
    """The generation settings shared by the generative tasks; options that only generation
    uses are refused when no task generates."""
    from gptforge.errors import GptforgeError
    from gptforge.eval.generative import GenSettings
    from gptforge.inference.chat import default_max_new_tokens

    formats = {f for _, f in pairs if f in GENERATIVE_FORMATS}
    if not formats:
        given = [flag for flag, unset in GENERATION_FLAGS if getattr(args, flag) != unset]
        if given:
            raise GptforgeError(f"--{given[0].replace('_', '-')} applies to generative tasks "
                                f"(--task-format {' or '.join(GENERATIVE_FORMATS)})")
        return None
    n = args.num_samples or 1
    temperature = args.temperature if args.temperature is not None else (0.0 if n == 1 else 0.8)
    max_new = args.max_new_tokens or default_max_new_tokens(block_size)
    if max_new >= block_size:
        raise GptforgeError(f"--max-new-tokens {max_new} leaves no room for the prompt in the "
                            f"model's context of {block_size} tokens")
    default_stops = GSM8K_STOPS if formats == {"gsm8k"} and not args.chat else ()
    extract = args.extract or ("number" if formats == {"gsm8k"} else "text")
    return GenSettings(num_samples=n, max_new_tokens=max_new, temperature=temperature,
                       seed=args.seed, stop=tuple(_unescape(t) for t in args.stop or ()) or
                       default_stops, extract=extract,
                       chat=args.chat, pass_k=tuple(args.pass_k or ()))


def _unescape(text: str) -> str:
    """``\\n`` and ``\\t`` typed in a shell argument stand for a newline and a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _lm_stream(args: argparse.Namespace, tokenizer):
    from gptforge.data.sources import iter_documents
    from gptforge.eval.lm import prepared_stream, text_stream

    if args.data:
        return prepared_stream(args.data, args.split, tokenizer)
    if args.text:
        documents = iter_documents(args.text, args.text_field)
        return text_stream(tokenizer, documents, args.max_tokens)
    return None


def _load_tasks(args: argparse.Namespace, pairs) -> list:
    """The tasks; --shots goes to those whose format takes shots (MMLU 5-shot beside PIQA
    0-shot in one --bench run), and is refused when none does."""
    from gptforge.errors import GptforgeError
    from gptforge.eval.tasks import SHOT_FORMATS, load_task

    takes_shots = [fmt in SHOT_FORMATS for _, fmt in pairs]
    if args.shots and len(pairs) > 1 and not any(takes_shots):
        raise GptforgeError(f"--shots applies to the formats {', '.join(SHOT_FORMATS)}; none "
                            "of the tasks has one")
    return [load_task(spec, fmt, max_examples=args.max_examples,
                      shots=args.shots if takes or len(pairs) == 1 else 0,
                      split=args.task_split, fewshot_from=args.fewshot_from)
            for (spec, fmt), takes in zip(pairs, takes_shots)]


def _evaluate_lm(args, model, tokenizer, stream, precision, progress: bool) -> dict:
    from gptforge.eval.lm import evaluate_stream

    started = time.perf_counter()
    result = evaluate_stream(model, tokenizer, stream, precision=precision, stride=args.stride,
                             batch_size=args.batch_size, max_tokens=args.max_tokens,
                             progress=progress)
    source = {"data": args.data, "split": args.split} if args.data else {"text": args.text}
    return {**source, **result.to_dict(), "seconds": round(time.perf_counter() - started, 3)}


def _evaluate_task(args, model, tokenizer, task, generation, precision, progress: bool) -> dict:
    from gptforge.eval.generative import evaluate_generative
    from gptforge.eval.multiple_choice import evaluate_examples

    started = time.perf_counter()
    if task.generative:
        result = evaluate_generative(model, tokenizer, task.examples, task.shots, generation,
                                     precision=precision, progress=progress)
        how = {"shots": task.n_shots, "chat": generation.chat, "extract": generation.extract,
               "temperature": generation.temperature, "stop": list(generation.stop)}
    else:
        result = evaluate_examples(model, tokenizer, task.examples, precision=precision,
                                   batch_size=args.batch_size, progress=progress)
        how = {"shots": task.n_shots}
    return {"task": task.spec, "format": task.format, **how, **result.to_dict(),
            "seconds": round(time.perf_counter() - started, 3)}


def _put_tasks(args: argparse.Namespace, results: dict, scored: list[dict]) -> None:
    """One task's results go under "task", several under "tasks"; --bench adds "core"."""
    from gptforge.eval.core import core_score

    if len(scored) == 1:
        results["task"] = scored[0]
    elif scored:
        results["tasks"] = scored
    if args.bench == "core":
        results["core"] = core_score([(t["task"], t) for t in scored])
