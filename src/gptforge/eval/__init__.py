"""Scoring a trained model: language-modelling metrics, multiple-choice and generative tasks.

- :mod:`~gptforge.eval.lm`: mean loss, perplexity and bits per byte of a token stream (prepared
  shards or raw text), in non-overlapping or sliding windows;
- :mod:`~gptforge.eval.multiple_choice`: accuracy on tasks scored by the log-likelihood of each
  answer's continuation (HellaSwag, ARC, PIQA, ...);
- :mod:`~gptforge.eval.exams`: MMLU, C-Eval and CMMLU from their published files, scored by
  answer letter, zero- or few-shot;
- :mod:`~gptforge.eval.generative`: generative tasks (GSM8K, your own): exact match of the
  extracted answer, pass@k, stop sequences, chat prompts;
- :mod:`~gptforge.eval.text_metrics`: BLEU, chrF, distinct-n and the repetition rate of
  generated text;
- :mod:`~gptforge.eval.core`: the CORE-style aggregate, centred accuracy averaged over tasks;
- :mod:`~gptforge.eval.tasks`: reading tasks from JSONL files or Hugging Face datasets;
- :mod:`~gptforge.eval.report`: the results as a table and as JSON.

``gptforge eval`` (``commands/eval.py``) puts them together; docs/evaluation.md explains the
metrics.
"""
