"""Training curves as data: runs read from ``metrics.jsonl``, series, smoothing and a summary.

This is the half of ``gptforge plot`` that needs no matplotlib, so it can be tested (and reused,
e.g. in a notebook) on its own; :mod:`gptforge.metrics.plotting` draws what it returns.

A run's ``metrics.jsonl`` holds three kinds of line (see :mod:`gptforge.train.loop`): training
lines (``step, loss, lr, grad_norm, tokens_per_sec, mfu, tokens`` and the objective's figures such
as DPO's ``reward_margin``), evaluation lines (``step, val_loss, val_ppl, ...``) and events
(``step, event, reason, lr_scale``: a skipped batch or a rollback). Only training lines carry
``tokens``; the x position of an evaluation or event on a tokens axis is interpolated from them.

Smoothing is TensorBoard's: an exponential moving average with the start-up bias removed (see
:func:`ema`).
"""

from __future__ import annotations

import bisect
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from gptforge.errors import GptforgeError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# What each --x choice reads from the training lines (``elapsed_sec``: wall-clock seconds of the
# run since step 0, all sessions of a resumed run together).
X_FIELDS = {"step": "step", "tokens": "tokens", "time": "elapsed_sec"}
# Fields that are positions or event details, not curves.
NOT_METRICS = {"step", "tokens", "elapsed_sec", "event", "reason", "lr_scale"}
# Training fields that are settings, not measurements: smoothing them would only distort them.
UNSMOOTHED = {"lr"}
# Drawn when --metrics is not given, those a run logged; loss and val_loss share a panel.
DEFAULT_METRICS = ("loss", "val_loss", "lr", "grad_norm", "tokens_per_sec", "mfu")


@dataclass
class Run:
    """The lines of one run's metrics file, sorted into their three kinds."""

    name: str
    path: Path  # the metrics file
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)

    def metrics(self) -> set[str]:
        """Names of the numeric fields this run logged at least once."""
        return {k for r in self.train + self.evals for k, v in r.items()
                if k not in NOT_METRICS and _finite(v) is not None}

    def is_eval_metric(self, name: str) -> bool:
        return any(name in r for r in self.evals)


@dataclass
class Series:
    x: list[float]
    y: list[float]


@dataclass
class Summary:
    name: str
    last_step: int
    tokens: int | None
    final_loss: float | None  # smoothed as the plot shows it
    best_val_loss: float | None
    best_val_step: int | None
    tokens_per_sec: float | None  # tokens / training time, the first logging window left out
    mfu: float | None


def _finite(value) -> float | None:
    """A plottable number, or None (metrics.jsonl writes inf/NaN as null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def metrics_path(run: str | Path) -> Path:
    """``RUN/metrics.jsonl`` for a run directory; a metrics file itself is taken as it is."""
    path = Path(run)
    if path.is_dir():
        path = path / METRICS_FILE
        if not path.is_file():
            raise GptforgeError(f"{path} not found: is {run} a training run directory?")
    elif not path.exists():
        raise GptforgeError(f"no such run directory: {run}")
    return path


def parse_lines(text: str, path: Path) -> list[dict]:
    """The records of a metrics file; a last line cut short by a crash is dropped with a warning."""
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    records = []
    for i, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the writer crashed mid-line; everything before is sound
                log.warning("%s: line %d is cut short (a crash while writing?); ignoring it",
                            path, number)
                break
            raise GptforgeError(f"{path} line {number} is not valid JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise GptforgeError(f"{path} line {number} is not a metrics record "
                                "(a JSON object with an integer 'step')")
        records.append(record)
    return records


def read_run(run: str | Path, name: str | None = None) -> Run:
    """Read one run (a run directory or its metrics.jsonl) and sort its lines by kind."""
    path = metrics_path(run)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise GptforgeError(f"cannot read {path}: {err}") from None
    records = parse_lines(text, path)
    if not records:
        raise GptforgeError(f"{path} holds no metrics yet (has the run logged a step?)")
    result = Run(name=name or _default_name(path), path=path)
    for record in records:
        if "event" in record:
            result.events.append(record)
        elif "val_loss" in record or any(k.startswith("val_") for k in record):
            result.evals.append(record)
        else:
            result.train.append(record)
    return result


def _default_name(path: Path) -> str:
    return path.parent.resolve().name if path.name == METRICS_FILE else path.stem


def run_labels(runs: list[str | Path]) -> list[str]:
    """Legend labels: each run directory's name, with parent folders added where names clash."""
    parts = [metrics_path(r).resolve().parent.parts for r in runs]
    labels = []
    for own in parts:
        others = [other for other in parts if other != own]  # the same run twice: one label
        depth = 1
        while depth < len(own) and any(other[-depth:] == own[-depth:] for other in others):
            depth += 1
        labels.append(str(Path(*own[-depth:])))
    return labels


def ema(values: list[float], smoothing: float) -> list[float]:
    """Exponential moving average with TensorBoard's debiasing.

    ``s_t = w * s_{t-1} + (1 - w) * v_t`` starting from ``s_0 = 0`` is pulled towards 0 for the
    first few points; dividing by ``1 - w**t`` (the total weight given so far) removes that pull,
    so the smoothed curve starts at the first value and every point is a weighted mean of the
    values up to it, recent ones weighing most.
    """
    if not 0.0 <= smoothing < 1.0:
        raise GptforgeError(f"smoothing must be in [0, 1), got {smoothing}")
    smoothed, last = [], 0.0
    for t, value in enumerate(values, 1):
        last = smoothing * last + (1.0 - smoothing) * value
        smoothed.append(last / (1.0 - smoothing ** t))
    return smoothed


def _x_lookup(run: Run, x: str):
    """A function step -> x position, for lines that lack the x field themselves."""
    key = X_FIELDS[x]
    if key == "step":
        return float
    known = {0: 0.0}  # nothing seen and no time spent before the first step
    for r in run.train:
        value = _finite(r.get(key))
        if value is None:
            hint = ("; a run trained before gptforge logged wall-clock time (elapsed_sec) "
                    "cannot use --x time: use --x step or --x tokens") if x == "time" else ""
            raise GptforgeError(f"--x {x}: {run.path} line for step {r['step']} has no "
                                f"'{key}'{hint}")
        known[r["step"]] = value
    steps = sorted(known)
    values = [known[s] for s in steps]

    def lookup(step: int) -> float:
        # Linear between logged steps (exact while the batch size is constant between them);
        # past the last one (an early stop between logging steps), the last slope carries on.
        i = bisect.bisect_left(steps, step)
        if i < len(steps) and steps[i] == step:
            return values[i]
        lo, hi = (i - 1, i) if 0 < i < len(steps) else (max(0, len(steps) - 2), len(steps) - 1)
        if lo == hi:
            return values[lo]
        slope = (values[hi] - values[lo]) / (steps[hi] - steps[lo])
        return values[lo] + slope * (step - steps[lo])

    return lookup


def series(run: Run, metric: str, x: str = "step") -> Series:
    """The points of ``metric`` in ``run`` against the chosen x axis (missing values left out)."""
    lines = run.evals if run.is_eval_metric(metric) else run.train
    lookup = _x_lookup(run, x)
    points = [(lookup(r["step"]), _finite(r.get(metric))) for r in lines]
    points = [(px, py) for px, py in points if py is not None]
    return Series([p[0] for p in points], [p[1] for p in points])


def event_positions(run: Run, x: str = "step") -> list[tuple[float, str]]:
    """``(x, kind)`` for each event of the run, kind being ``skip`` or ``rollback``."""
    lookup = _x_lookup(run, x)
    return [(lookup(e["step"]), str(e["event"])) for e in run.events]


def smoothable(metric: str, run: Run) -> bool:
    """Noisy training measurements are smoothed; evaluations and settings (lr) are not."""
    return metric not in UNSMOOTHED and not run.is_eval_metric(metric)


def check_x(runs: list[Run], x: str) -> None:
    """Refuse an x axis that some run cannot provide, before anything is drawn."""
    if x not in X_FIELDS:
        raise GptforgeError(f"--x must be one of {', '.join(X_FIELDS)}, got {x!r}")
    for run in runs:
        _x_lookup(run, x)


def mean_throughput(run: Run) -> tuple[float | None, float | None]:
    """Tokens per second of training time, and the MFU that goes with it.

    Each training line's ``tokens_per_sec`` was measured over the window since the previous line,
    so the window took ``tokens / tokens_per_sec`` seconds; the mean is all tokens over all those
    seconds (a plain mean of the rates would overweight short windows). The first window also
    holds start-up work (compilation, memory allocation) and is left out when there are others.
    MFU is proportional to tokens/s, so it is averaged with the same time weights.
    """
    windows, previous = [], 0
    for r in run.train:
        tokens, rate, mfu = _finite(r.get("tokens")), _finite(r.get("tokens_per_sec")), \
            _finite(r.get("mfu"))
        if tokens is None:
            continue
        seen, previous = tokens - previous, tokens
        if rate is not None and rate > 0 and seen > 0:
            windows.append((seen, seen / rate, mfu))
    if len(windows) > 1:
        windows = windows[1:]
    seconds = sum(w[1] for w in windows)
    if not windows or seconds <= 0:
        return None, None
    rate = sum(w[0] for w in windows) / seconds
    timed_mfu = [(s, m) for _, s, m in windows if m is not None]
    mfu = (sum(s * m for s, m in timed_mfu) / sum(s for s, _ in timed_mfu)) if timed_mfu else None
    return rate, mfu


def summarize(run: Run, smoothing: float) -> Summary:
    losses = series(run, "loss").y
    final_loss = ema(losses, smoothing)[-1] if losses else None
    vals = [(v, r["step"]) for r in run.evals if (v := _finite(r.get("val_loss"))) is not None]
    best_val, best_step = min(vals, key=lambda p: (p[0], p[1])) if vals else (None, None)
    tokens = [t for r in run.train if (t := _finite(r.get("tokens"))) is not None]
    rate, mfu = mean_throughput(run)
    last_step = max(r["step"] for r in run.train + run.evals + run.events)
    return Summary(name=run.name, last_step=last_step,
                   tokens=int(tokens[-1]) if tokens else None, final_loss=final_loss,
                   best_val_loss=best_val, best_val_step=best_step, tokens_per_sec=rate, mfu=mfu)


def format_summary(summaries: list[Summary], smoothing: float) -> str:
    """A plain-text table, one row per run."""
    loss_header = f"train loss (EMA {smoothing:g})" if smoothing > 0 else "train loss"
    header = ["run", "last step", "tokens", loss_header, "best val loss (step)", "tokens/s",
              "MFU"]
    rows = [header]
    for s in summaries:
        rows.append([
            s.name, f"{s.last_step:,}", _or_dash(s.tokens, "{:,}"),
            _or_dash(s.final_loss, "{:.4f}"),
            "-" if s.best_val_loss is None else f"{s.best_val_loss:.4f} ({s.best_val_step:,})",
            _or_dash(s.tokens_per_sec, "{:,.0f}"), _or_dash(s.mfu, "{:.1%}")])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    return "\n".join(lines)


def _or_dash(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def resolve_metrics(runs: list[Run], requested: list[str] | None) -> list[str]:
    """The metrics to draw: the requested ones (each logged by some run), or the defaults."""
    available = set().union(*(run.metrics() for run in runs))
    if requested is None:
        return [m for m in DEFAULT_METRICS if m in available and _informative(m, runs)]
    unknown = [m for m in requested if m not in available]
    if unknown:
        raise GptforgeError(f"unknown metric {', '.join(unknown)}; these runs logged: "
                            f"{', '.join(sorted(available))}")
    return list(dict.fromkeys(requested))


def _informative(metric: str, runs: list[Run]) -> bool:
    """MFU is logged as 0 where no peak FLOP/s is known: an all-zero panel says nothing."""
    if metric != "mfu":
        return True
    return any(_finite(r.get("mfu")) for run in runs for r in run.train)


def panels(metrics: list[str]) -> list[list[str]]:
    """Group metrics into panels: ``val_X`` shares ``X``'s panel (loss with val_loss), the rest
    get one each, in the order first named; within a panel the training curve comes first."""
    chosen = set(metrics)
    groups: dict[str, list[str]] = {}
    for metric in metrics:
        base = metric[len("val_"):] if metric.startswith("val_") else metric
        groups.setdefault(base if base in chosen else metric, []).append(metric)
    return [sorted(group, key=lambda m: m.startswith("val_")) for group in groups.values()]
