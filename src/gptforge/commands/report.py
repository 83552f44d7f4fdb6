"""``gptforge report``: the report card of a training run, as Markdown and self-contained HTML."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="write a run's report card: config, data, model, curves, scores, samples",
        description="Write RUN_DIR's report card as report.md and report.html (self-contained, "
                    "plots embedded): config, data and tokenizer, parameters and FLOPs, time "
                    "and tokens, curves and whether the run is on track against the preset's "
                    "reference curve, eval scores beside published ones, samples, machine. "
                    "See docs/evaluation.md.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory")
    p.add_argument("--eval", nargs="+", default=[], metavar="RESULTS.json",
                   help="results files written by `gptforge eval --out`")
    p.add_argument("--out", metavar="DIR", help="folder to write into (default: RUN_DIR/report)")
    p.add_argument("--samples", type=int, default=2, metavar="N",
                   help="samples shown: the last N the run logged, else N generated from the "
                        "latest checkpoint (default: 2; 0 leaves them out)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gptforge.errors import GptforgeError
    from gptforge.eval.report_card import build_report, write_report

    if args.samples < 0:
        raise GptforgeError(f"--samples must be 0 or more, got {args.samples}")
    out = Path(args.out) if args.out else Path(args.run_dir) / "report"
    if out.exists() and not out.is_dir():
        raise GptforgeError(f"--out {out} is a file; name a folder")
    report = build_report(args.run_dir, args.eval, samples=args.samples)
    markdown, page = write_report(report, out)
    print(f"wrote {markdown} and {page}")
    return 0
