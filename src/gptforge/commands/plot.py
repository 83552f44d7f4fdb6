"""``gptforge plot``: training curves of one or more runs in one figure, and a summary table."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

X_CHOICES = ("step", "tokens", "time")  # the keys of gptforge.metrics.curves.X_FIELDS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plot", help="draw training curves of runs (overlaid to compare them) and summarize them",
        description="Draw the curves in RUN/metrics.jsonl of each run, one colour per run, and "
                    "print a summary per run. Needs matplotlib: pip install 'gptforge[plot]'.")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run directories (or metrics.jsonl files)")
    p.add_argument("--out", default="plot.png", metavar="FILE",
                   help="image to write: .png, .svg or .pdf (default: plot.png)")
    p.add_argument("--x", choices=X_CHOICES, default="step",
                   help="x axis: optimizer steps, tokens seen (fair across batch sizes), or "
                        "training time (needs a wall-clock field in metrics.jsonl)")
    p.add_argument("--metrics", metavar="A,B,...",
                   help="metrics to draw, comma-separated (default: loss,val_loss,lr,grad_norm,"
                        "tokens_per_sec,mfu, those the runs logged); val_X shares X's panel")
    p.add_argument("--smooth", type=float, default=0.6, metavar="W",
                   help="EMA weight for training curves, 0 (off) to below 1 (default: 0.6)")
    p.add_argument("--log-y", action="store_true", help="logarithmic y axes")
    p.add_argument("--title", help="figure title (default: the run names)")
    p.add_argument("--reference", nargs="?", const="auto", metavar="NAME",
                   help="overlay the stored reference curve of the first run's preset (found "
                        "from RUN/config.toml), or the one named NAME, and say whether each run "
                        "is on track; see docs/plots.md")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gptforge.errors import GptforgeError
    from gptforge.metrics import curves, plotting, references

    out = Path(args.out)
    plotting.check_out(out)
    if not 0.0 <= args.smooth < 1.0:
        raise GptforgeError(f"--smooth must be at least 0 and below 1; got {args.smooth:g}")
    requested = None
    if args.metrics is not None:
        requested = [m.strip() for m in args.metrics.split(",") if m.strip()]
        if not requested:
            raise GptforgeError("--metrics names no metric")
    labels = curves.run_labels(args.runs)
    runs = [curves.read_run(path, name) for path, name in zip(args.runs, labels)]
    reference = _reference(args.reference, args.runs[0]) if args.reference else None
    drawn = runs + ([reference.run] if reference else [])
    curves.check_x(drawn, args.x)
    metrics = curves.resolve_metrics(runs, requested)
    if not metrics:
        raise GptforgeError("these runs logged none of the default metrics; choose with --metrics")
    fig = plotting.draw(runs, metrics, x=args.x, smoothing=args.smooth, log_y=args.log_y,
                        title=args.title, reference=reference.run if reference else None)
    plotting.save(fig, out)
    print(curves.format_summary([curves.summarize(r, args.smooth) for r in drawn], args.smooth))
    for run_ in runs if reference else []:
        print(f"{run_.name}: {references.compare(run_, reference.run).sentence(reference.name)}")
    log.info("wrote %s", out)
    return 0


def _reference(choice: str, first_run: str):
    """The reference named on the command line, or the one matching the first run's config."""
    from gptforge.errors import GptforgeError
    from gptforge.metrics import curves, references

    if choice != "auto":
        return references.load_reference(choice)
    run_dir = curves.metrics_path(first_run).parent
    found = references.find_reference(references.run_config(run_dir))
    if found is None:
        raise GptforgeError(f"--reference: no stored reference curve matches the corpus, "
                            f"tokenizer and model shape of {run_dir} (stored: "
                            f"{', '.join(references.reference_names())}); name one to overlay "
                            "it anyway, e.g. --reference shakespeare_char")
    return found
