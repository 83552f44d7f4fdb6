"""What a sweep leaves behind: the results table, a plot per parameter, and the best config.

- ``results.csv`` and ``results.md``: one row per trial (its values, objective, state, steps,
  seconds), rewritten after every sweep so they always describe the whole study.
- ``objective.png``: the objective against each swept parameter (needs matplotlib; skipped with
  a message without it), pruned trials drawn at the last value they reached.
- ``best.toml``: the best trial's config written like a preset, only the settings that differ
  from the defaults, so ``gptforge train -c SWEEP_DIR/best.toml`` trains it at full length.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from gptforge import atomic
from gptforge.config.loader import load_config, to_toml
from gptforge.sweep.space import Param

log = logging.getLogger(__name__)

STATE_NAMES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned",
               TrialState.FAIL: "failed", TrialState.RUNNING: "running"}


def write(study: optuna.Study, params: list[Param], out_dir: Path, base_config: Path,
          metric: str) -> None:
    """Write the table, the plot and ``best.toml`` for the study as it stands."""
    shown = [t for t in study.get_trials(deepcopy=False) if t.state in STATE_NAMES]
    rows = [table_row(t, params) for t in shown]
    columns = ["trial", *(p.key for p in params), "objective", "state", "steps", "seconds"]
    atomic.write_text(out_dir / "results.csv", _csv(columns, rows))
    best = best_trial(study)
    atomic.write_text(out_dir / "results.md", _markdown(columns, rows, metric, best))
    if best is not None:
        atomic.write_text(out_dir / "best.toml", best_config_text(best, params, base_config,
                                                                  metric))
        log.info("best: trial %d, %s %.4f (%s); config in %s", best.number, metric, best.value,
                 ", ".join(p.show(best.params[p.key]) for p in params),
                 out_dir / "best.toml")
    else:
        log.warning("no trial completed: no best.toml (see the trials' train.log)")
    _plot(shown, params, out_dir / "objective.png", metric)
    log.info("results in %s and %s", out_dir / "results.md", out_dir / "results.csv")


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return min(done, key=lambda t: t.value) if done else None


def table_row(trial: FrozenTrial, params: list[Param]) -> dict:
    state = STATE_NAMES[trial.state]
    if trial.user_attrs.get("interrupted"):
        state = "interrupted"
    row = {"trial": trial.number}
    row.update({p.key: trial.params.get(p.key, "") for p in params})
    row.update(objective=trial.value if trial.value is not None else "", state=state,
               steps=trial.user_attrs.get("steps", ""), seconds=trial.user_attrs.get("seconds", ""))
    return row


def _csv(columns: list[str], rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _markdown(columns: list[str], rows: list[dict], metric: str,
              best: FrozenTrial | None) -> str:
    lines = [f"# Sweep results: {metric} (lower is better)", ""]
    if best is not None:
        lines += [f"Best: trial {best.number}, {metric} {best.value:.4f}.", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_cell(row[c]) for c in columns]
        if best is not None and row["trial"] == best.number:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def best_config_text(best: FrozenTrial, params: list[Param], base_config: Path,
                     metric: str) -> str:
    """``best.toml``: the best trial's settings that differ from the defaults, preset style."""
    overrides = [p.override(best.params[p.key]) for p in params]
    ours = _sections(to_toml(load_config(str(base_config), overrides)))
    defaults = _sections(to_toml(load_config(None)))
    swept = {p.key for p in params}
    lines = [f"# The best trial ({best.number}) of a gptforge sweep: {metric} {best.value:.4f}.",
             "# Values marked 'swept' were chosen by the sweep on short runs; train.max_steps",
             "# is the sweep's config's own. Train it: gptforge train -c THIS_FILE"]
    for section, entries in ours.items():
        kept = [(key, line) for key, line in entries.items()
                if f"{section}.{key}" in swept or line != defaults[section].get(key)]
        if not kept:
            continue
        lines.append(f"\n[{section}]")
        lines.extend(line + ("  # swept" if f"{section}.{key}" in swept else "")
                     for key, line in kept)
    return "\n".join(lines) + "\n"


def _sections(text: str) -> dict[str, dict[str, str]]:
    """{section: {key: 'key = value'}} of a TOML text written by :func:`to_toml`."""
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif current is not None and " = " in line:
            current[line.split(" = ", 1)[0]] = line
    return sections


def _plot(trials: list[FrozenTrial], params: list[Param], out: Path, metric: str) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.info("matplotlib is not installed: no objective.png (pip install 'gptforge[plot]')")
        return
    from gptforge.metrics import plotting

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    fig = Figure(figsize=(4.5 * len(params), 4), layout="constrained")
    FigureCanvasAgg(fig)
    for i, param in enumerate(params):
        _plot_param(fig.add_subplot(1, len(params), i + 1), trials, param, metric)
    fig.suptitle(f"sweep: {metric} against each parameter")
    plotting.save(fig, out)


def _plot_param(ax, trials: list[FrozenTrial], param: Param, metric: str) -> None:
    """One panel: finished trials as dots, pruned ones as crosses at their last value."""
    numeric = not isinstance(param.distribution, CategoricalDistribution) or all(
        _number(v) is not None for v in param.distribution.choices)
    drawn = False
    for state, marker, colour in ((TrialState.COMPLETE, "o", "tab:blue"),
                                  (TrialState.PRUNED, "x", "0.5")):
        points = [(t.params[param.key], _last_value(t)) for t in trials
                  if t.state == state and param.key in t.params and _last_value(t) is not None]
        if not points:
            continue
        xs = [_number(x) if numeric else str(x) for x, _ in points]
        ax.scatter(xs, [y for _, y in points], marker=marker, color=colour,
                   label=STATE_NAMES[state])
        drawn = True
    # Choices a decade or more apart (learning rates) read best on a log axis.
    spread = [_number(v) for v in getattr(param.distribution, "choices", ())] if numeric else []
    if param.is_log or (len(spread) > 1 and min(spread) > 0 and max(spread) / min(spread) >= 100):
        ax.set_xscale("log")
    ax.set_xlabel(param.key)
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)


def _last_value(trial: FrozenTrial) -> float | None:
    if trial.value is not None:
        return trial.value
    steps = trial.intermediate_values
    return steps[max(steps)] if steps else None


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
