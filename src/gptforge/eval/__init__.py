"""Scoring a trained model: language-modelling metrics and multiple-choice tasks.

- :mod:`~gptforge.eval.lm`: mean loss, perplexity and bits per byte of a token stream (prepared
  shards or raw text), in non-overlapping or sliding windows;
- :mod:`~gptforge.eval.multiple_choice`: accuracy on tasks scored by the log-likelihood of each
  answer's continuation (HellaSwag, ARC, PIQA, ...);
- :mod:`~gptforge.eval.tasks`: reading such tasks from JSONL files or Hugging Face datasets;
- :mod:`~gptforge.eval.report`: the results as a table and as JSON.

``gptforge eval`` (``commands/eval.py``) puts them together; docs/evaluation.md explains the
metrics.
"""
