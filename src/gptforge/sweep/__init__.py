"""Hyperparameter sweeps: many short training runs, each a real ``gptforge train`` process.

:mod:`space` turns ``--param key=SPEC`` into Optuna distributions checked against the config
schema; :mod:`trials` runs one trial as a child process and watches its ``metrics.jsonl`` so a bad
trial can be pruned; :mod:`study` drives an Optuna study stored in the sweep directory (so a killed
sweep resumes where it stopped); :mod:`results` writes the table, the plot and ``best.toml``.
"""

SAMPLERS = ("tpe", "random", "grid")
METRICS = ("val_loss", "val_ppl", "loss")  # what a sweep can minimise, as metrics.jsonl names them
