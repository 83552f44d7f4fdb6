"""The results of ``gptforge eval``: one JSON-ready dict, and the table printed from it.

The dict (written by ``--out``) says what was scored and how, so two runs can be compared
without guessing: the checkpoint and its step, the model's size, the device and precision, and
per evaluation the data or task, the counts and the seconds it took::

    {"gptforge_version": "0.1.0", "checkpoint": "/runs/a/ckpt/step-002000", "step": 2000,
     "model": {"params": 3222912, "n_layer": 4, ...}, "device": "cuda", "dtype": "bfloat16",
     "lm": {"data": "data/x", "split": "val", "loss": 1.52, "perplexity": 4.57,
            "bits_per_byte": 2.19, "tokens": 111540, "bytes": 111540, ...},
     "task": {"task": "hf:Rowan/hellaswag@validation", "format": "hellaswag",
              "examples": 10042, "acc": 0.29, "acc_stderr": 0.0045, "skipped": 0, ...},
     "seconds": 12.3}

A generative task's entry holds ``exact_match``, ``pass@K``, ``bleu``, ``chrf``,
``distinct_1``, ``distinct_2``, ``repetition_4`` and a few ``samples``. Several tasks go under
``"tasks"`` (a list) instead of ``"task"``, and ``--bench core`` adds ``"core"``
(``core.py``).
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
    for task in ([results["task"]] if "task" in results else results.get("tasks", [])):
        lines += ["", *(_generative_lines(task) if "exact_match" in task else _task_lines(task))]
    if "core" in results:
        lines += ["", *_core_lines(results["core"])]
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


def _shots(task: dict) -> str:
    return f", {task['shots']}-shot" if task.get("shots") else ""


def _task_lines(task: dict) -> list[str]:
    skipped = task.get("skipped", 0)
    lines = [f"multiple choice: {task['task']} (format {task['format']}{_shots(task)})",
             f"  {task['examples']:,} examples, {task['seconds']:.1f} s",
             f"  {'acc':<16}{task['acc']:.4f} ± {task['acc_stderr']:.4f}",
             f"  {'acc_norm':<16}{task['acc_norm']:.4f} ± {task['acc_norm_stderr']:.4f}"]
    if task.get("groups"):
        accs = sorted(task["groups"].items(), key=lambda kv: kv[1]["acc"])
        lines.append(f"  {'subjects':<16}{len(accs)}; lowest {accs[0][0]} "
                     f"{accs[0][1]['acc']:.4f}, highest {accs[-1][0]} {accs[-1][1]['acc']:.4f}")
    if skipped:
        lines.append(f"  {'skipped':<16}{skipped:,} examples with a choice longer than the "
                     f"context (first: {task['skipped_examples'][0]})")
    return lines


def _number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _generative_lines(task: dict) -> list[str]:
    how = f"{task['num_samples']} sample(s), temperature {task['temperature']}" \
          f"{', chat' if task['chat'] else ''}, extract {task['extract']}"
    lines = [f"generative: {task['task']} (format {task['format']}{_shots(task)})",
             f"  {task['examples']:,} examples, {how}, {task['seconds']:.1f} s",
             f"  {'exact_match':<16}{task['exact_match']:.4f} ± "
             f"{task['exact_match_stderr']:.4f}"]
    lines += [f"  {key:<16}{value:.4f}" for key, value in task.items()
              if key.startswith("pass@")]
    lines += [f"  {'BLEU / chrF':<16}{_number(task['bleu'], 2)} / {_number(task['chrf'], 2)}",
              f"  {'distinct-1 / 2':<16}{_number(task['distinct_1'])} / "
              f"{_number(task['distinct_2'])}",
              f"  {'repetition-4':<16}{_number(task['repetition_4'])}"
              "  (share of repeated 4-grams; near 1: the model loops)"]
    return lines


def _core_lines(core: dict) -> list[str]:
    lines = [f"CORE-style aggregate (centred accuracy, mean of {len(core['tasks'])} tasks): "
             f"{core['core']:.4f}"]
    lines += [f"  {e['task']}: {e['metric']} {e['accuracy']:.4f}, baseline "
              f"{e['random_baseline']:.4f}, centred {e['centred']:.4f}" for e in core["tasks"]]
    return lines
