"""Drawing training curves: one figure, one panel per metric, one colour per run.

The data comes from :mod:`gptforge.metrics.curves`. matplotlib is an optional dependency
(``pip install 'gptforge[plot]'``) imported only when a figure is drawn, and never through
``pyplot``: the figure is drawn on its own Agg canvas, so no global backend is chosen and no window
can open, whatever the environment (a server, a notebook, a CI job).
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path

from gptforge import atomic
from gptforge.errors import GptforgeError
from gptforge.metrics import curves
from gptforge.metrics.curves import Run

FORMATS = (".png", ".svg", ".pdf")
TITLES = {"loss": "loss", "lr": "learning rate", "grad_norm": "gradient norm (before clipping)",
          "tokens_per_sec": "throughput (tokens/s)", "mfu": "MFU (model FLOPs utilization)",
          "val_ppl": "validation perplexity"}
EVENT_STYLES = {"rollback": "-.", "skip": ":"}
RAW_ALPHA = 0.25  # the unsmoothed curve, drawn faintly behind the smoothed one
REFERENCE_COLOUR = "0.15"


def _matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise GptforgeError("plotting needs matplotlib: pip install 'gptforge[plot]'") from None
    mpl_log = logging.getLogger("matplotlib")
    if mpl_log.level == logging.NOTSET:  # its INFO lines ("generated new fontManager") are noise
        mpl_log.setLevel(logging.WARNING)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg


def available() -> bool:
    """Whether matplotlib can be imported (callers that can do without the figure ask first)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def check_out(out: Path) -> None:
    """Refuse an output the figure cannot be written to, before any work is done."""
    if out.suffix.lower() not in FORMATS:
        raise GptforgeError(f"--out must end in {', '.join(FORMATS)}; got {out}")
    if out.is_dir():
        raise GptforgeError(f"--out {out} is a directory; name an image file")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:  # creating the folders would only say "File exists"
        raise GptforgeError(f"cannot write {out}: {blocker} is a file, not a directory")


def draw(runs: list[Run], metrics: list[str], *, x: str = "step", smoothing: float = 0.6,
         log_y: bool = False, title: str | None = None, reference: Run | None = None):
    """A matplotlib Figure of ``metrics`` for ``runs``; panels as :func:`curves.panels` groups.

    ``reference`` (a stored reference curve, :mod:`gptforge.metrics.references`) is drawn like
    one more run, in near-black so that it stands apart from the runs' colours."""
    Figure, FigureCanvasAgg = _matplotlib()
    groups = curves.panels(metrics)
    fig = Figure(figsize=(12, 1.2 + 3.4 * math.ceil(len(groups) / 2)) if len(groups) > 1
                 else (8, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = _layout(fig, len(groups))
    colours = _colours(len(runs))
    titled = runs
    if reference is not None:
        runs, colours = [*runs, reference], [*colours, REFERENCE_COLOUR]
    divisor, x_label = _x_scale(runs, x)
    for ax, group in zip(axes, groups):
        for run, colour in zip(runs, colours):
            for metric in group:
                _plot_metric(ax, run, metric, x, divisor, colour, smoothing, len(group) > 1)
            for position, kind in curves.event_positions(run, x):
                ax.axvline(position / divisor, color=colour, linestyle=EVENT_STYLES.get(kind, "--"),
                           linewidth=1.0, alpha=0.8)
        _decorate(ax, group, log_y)
    for ax in axes[-2:] if len(axes) > 1 else axes:
        ax.set_xlabel(x_label)
    _legend(axes[0], runs, colours, groups[0], smoothing)
    fig.suptitle(title if title is not None else " vs ".join(run.name for run in titled))
    return fig


def save(fig, out: Path) -> None:
    """Write the figure atomically, in the format its name ends with."""
    check_out(out)
    from matplotlib import rc_context

    buffer = io.BytesIO()
    # SVG text as text, not glyph outlines: run names stay searchable and editable.
    with rc_context({"svg.fonttype": "none"}):
        fig.savefig(buffer, format=out.suffix.lower()[1:], dpi=120)
    try:
        atomic.write_bytes(out, buffer.getvalue())
    except OSError as err:
        raise GptforgeError(f"cannot write {out}: {err.strerror or err}") from None


def _layout(fig, n: int) -> list:
    """Two columns; with an odd count the first panel (the losses) spans the top row."""
    if n == 1:
        return [fig.add_subplot(1, 1, 1)]
    rows = math.ceil(n / 2)
    grid = fig.add_gridspec(rows, 2)
    first = fig.add_subplot(grid[0, :] if n % 2 else grid[0, 0])
    axes = [first]
    cells = [(r, c) for r in range(rows) for c in range(2)][2 if n % 2 else 1:]
    for r, c in cells[:n - 1]:
        axes.append(fig.add_subplot(grid[r, c], sharex=first))
    return axes


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _x_scale(runs: list[Run], x: str) -> tuple[float, str]:
    """What to divide x values by, and the axis label (time in the largest fitting unit)."""
    if x == "step":
        return 1.0, "step"
    if x == "tokens":
        return 1.0, "tokens"
    longest = max((max(curves.series(run, "loss", x).x, default=0.0) for run in runs),
                  default=0.0)
    for seconds, unit in ((3600.0, "h"), (60.0, "min")):
        if longest >= 2 * seconds:
            return seconds, f"training time ({unit})"
    return 1.0, "training time (s)"


def _plot_metric(ax, run: Run, metric: str, x: str, divisor: float, colour, smoothing: float,
                 shared: bool) -> None:
    points = curves.series(run, metric, x)
    if not points.y:
        return
    xs = [v / divisor for v in points.x]
    if not curves.smoothable(metric, run):
        # An evaluation (or lr): few points, each exact; markers show where they were taken.
        marker = "o" if run.is_eval_metric(metric) else None
        ax.plot(xs, points.y, color=colour, linewidth=1.6, marker=marker, markersize=3.5)
        return
    # Beside its val curve a training curve is dashed and thin, so the two stay apart.
    style = dict(linestyle="--", linewidth=1.1) if shared else dict(linewidth=1.4)
    if smoothing > 0:
        ax.plot(xs, points.y, color=colour, linewidth=0.8, alpha=RAW_ALPHA)
        ax.plot(xs, curves.ema(points.y, smoothing), color=colour, **style)
    else:
        ax.plot(xs, points.y, color=colour, **style)


def _decorate(ax, group: list[str], log_y: bool) -> None:
    from matplotlib.ticker import EngFormatter, LogFormatter, PercentFormatter

    ax.set_title(TITLES.get(group[0], group[0]), fontsize=10)  # a val_X shares X's title
    if log_y:  # first: choosing the scale resets the tick formatters
        ax.set_yscale("log")
    if group == ["mfu"]:
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    elif group == ["tokens_per_sec"]:
        ax.yaxis.set_major_formatter(EngFormatter())
    elif log_y:
        # Losses often span less than a decade: label the in-between (minor) ticks too where
        # there is room, as plain numbers ("4", "0.0003") rather than "4 x 10^0" or "3e-04".
        plain = _plain(LogFormatter)
        ax.yaxis.set_major_formatter(plain())
        ax.yaxis.set_minor_formatter(plain(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.grid(True, alpha=0.3)


def _plain(log_formatter):
    """A log-axis formatter that labels the ticks matplotlib would, written with ``:g``."""

    class PlainLogFormatter(log_formatter):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    return PlainLogFormatter


def _legend(ax, runs: list[Run], colours: list, group: list[str], smoothing: float) -> None:
    """Runs by colour; then, in grey, what the line styles mean."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, linewidth=2, label=run.name)
               for run, c in zip(runs, colours)]
    grey = "0.4"
    if len(group) > 1:
        train, val = group[0], group[1]
        handles.append(Line2D([], [], color=grey, linestyle="--", label=f"{train} (train)"))
        handles.append(Line2D([], [], color=grey, marker="o", markersize=3.5, label=val))
    if smoothing > 0:
        handles.append(Line2D([], [], color=grey, alpha=RAW_ALPHA,
                              label=f"raw (faint); EMA {smoothing:g} on top"))
    kinds = sorted({str(e["event"]) for run in runs for e in run.events})
    for kind in kinds:
        handles.append(Line2D([], [], color=grey, linestyle=EVENT_STYLES.get(kind, "--"),
                              label=kind))
    ax.legend(handles=handles, fontsize=8, loc="best")
