"""A CORE-style aggregate: centred accuracy averaged over tasks.

Raw accuracies of different tasks cannot be averaged fairly: guessing scores 0.5 on PIQA (two
choices) and 0.25 on MMLU (four). The DCLM paper (Li et al. 2024, "DataComp-LM: In search of the
next generation of training sets for language models", the CORE score) and nanochat's CORE
metric centre each task's accuracy on its random baseline first::

    centred = (acc - random_baseline) / (1 - random_baseline)

so that 0 is chance and 1 is perfect on every task, then average the centred accuracies.
gptforge uses each multiple-choice task's ``acc_norm`` (for letter-scored exams it equals ``acc``)
and the expected accuracy of guessing, the mean of ``1 / number of choices`` over its examples;
a generative task contributes its exact match with a baseline of 0. The mix of tasks is the
user's: the number is comparable only between runs scored on the same tasks and rows (nanochat's
CORE uses DCLM's 22 tasks).
"""

from __future__ import annotations

from collections.abc import Sequence


def centred_accuracy(acc: float, random_baseline: float) -> float:
    return (acc - random_baseline) / (1.0 - random_baseline)


def task_entry(name: str, result: dict) -> dict:
    """The accuracy, baseline and centred accuracy of one task's results dict."""
    if "exact_match" in result:
        acc, baseline, metric = result["exact_match"], 0.0, "exact_match"
    else:
        acc, baseline, metric = result["acc_norm"], result["random_baseline"], "acc_norm"
    return {"task": name, "metric": metric, "accuracy": acc, "random_baseline": baseline,
            "centred": centred_accuracy(acc, baseline)}


def core_score(named_results: Sequence[tuple[str, dict]]) -> dict:
    """``{"core": mean centred accuracy, "tasks": [...]}`` over ``(name, results)`` pairs."""
    entries = [task_entry(name, result) for name, result in named_results]
    return {"core": sum(e["centred"] for e in entries) / len(entries), "tasks": entries}
