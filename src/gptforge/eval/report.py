"""The results of ``gptforge eval``: one JSON-ready dict, and the table printed from it.

The dict (written by ``--out``) says what was scored and how, so two runs can be compared
without guessing: the checkpoint and its step, the model's size, the device and precision, and
per evaluation the data or task, the counts and the seconds it took::

    {"gptforge_version": "0.1.0", "checkpoint": "/runs/a/ckpt/step-002000", "step": 2000,
     "model": {"params": 3222912, "n_layer": 4, ...}, "device": "cuda", "dtype": "bfloat16",
     "lm": {"data": "data/x", "split": "val", "loss": 1.52, "perplexity": 4.57,
            "bits_per_byte": 2.19, "tokens": 111540, "bytes": 111540, ...},
     "task": {"task": "hf:Rowan/hellaswag@validation", "format": "hellaswag",
              "examples": 10042, "acc": 0.29, "acc_stderr": 0.0045, ...},
     "seconds": 12.3}
"""

from __future__ import annotations

from pathlib import Path


def model_summary(model, meta: dict) -> dict:
    cfg = model.config
    return {"params": model.num_params(), "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_embd": cfg.n_embd, "block_size": cfg.block_size, "vocab_size": cfg.vocab_size,
            "lora": "lora" in meta}


def header(ckpt: Path, meta: dict, model, precision) -> dict:
    from gptforge import __version__

    return {"gptforge_version": __version__, "checkpoint": str(Path(ckpt).resolve()),
            "step": meta.get("step"), "model": model_summary(model, meta),
            "device": str(precision.device), "dtype": precision.name}


def format_table(results: dict) -> str:
    m = results["model"]
    lines = [f"checkpoint  {results['checkpoint']}",
             f"            step {results['step']}, {m['params'] / 1e6:.2f}M parameters, "
             f"{m['n_layer']} layers x {m['n_embd']} wide, context {m['block_size']}"
             f"{', LoRA merged' if m['lora'] else ''}; {results['device']} {results['dtype']}"]
    if "lm" in results:
        lines += ["", *_lm_lines(results["lm"])]
    if "task" in results:
        lines += ["", *_task_lines(results["task"])]
    return "\n".join(lines)


def _lm_lines(lm: dict) -> list[str]:
    source = f"{lm['data']} ({lm['split']} split)" if "data" in lm else ", ".join(lm["text"])
    windows = f"window {lm['block_size']}, stride {lm['stride']}"
    bpb = "n/a" if lm["bits_per_byte"] is None else f"{lm['bits_per_byte']:.4f}"
    return [f"language modelling: {source}",
            f"  {lm['tokens']:,} tokens ({lm['bytes']:,} bytes of text) in {lm['windows']:,} "
            f"windows ({windows}), {lm['seconds']:.1f} s",
            f"  {'loss':<16}{lm['loss']:.4f} nats/token",
            f"  {'perplexity':<16}{lm['perplexity']:.4f}",
            f"  {'bits per byte':<16}{bpb}"]


def _task_lines(task: dict) -> list[str]:
    return [f"multiple choice: {task['task']} (format {task['format']})",
            f"  {task['examples']:,} examples, {task['seconds']:.1f} s",
            f"  {'acc':<16}{task['acc']:.4f} ± {task['acc_stderr']:.4f}",
            f"  {'acc_norm':<16}{task['acc_norm']:.4f} ± {task['acc_norm_stderr']:.4f}"]
