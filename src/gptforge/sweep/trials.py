"""One sweep trial: a real ``gptforge train`` run in a child process, watched through its metrics.

A trial runs as ``python -m gptforge train`` rather than in the sweep's own process, so a trial
that crashes, runs out of memory or hangs costs that trial only, and several trials can train side
by side. The child's ``metrics.jsonl`` is read as it grows: each new value of the objective metric
is reported to the pruner, and a trial the pruner gives up on is stopped early.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

POLL_SECONDS = 0.5
STOP_GRACE_SECONDS = 10.0  # a SIGTERM'd trial saves a checkpoint; then it is killed
# Exit codes of a trial stopped from outside: train's own 128 + SIGINT/SIGTERM, or killed by one.
STOPPED_BY_SIGNAL = (130, 143, -2, -9, -15)


@dataclass
class Outcome:
    """What a finished (or stopped) trial produced."""

    value: float | None  # the last value of the metric; None if it never logged one
    steps: int  # the last step the trial logged
    seconds: float
    pruned: bool = False
    error: str | None = None  # why the trial failed, in one line
    interrupted: bool = False  # stopped by a signal from outside (Ctrl-C, a scheduler)


def train_command(base_config: Path, overrides: list[str], budget: int, run_dir: Path) -> list[str]:
    """The command of one trial: the sweep's config, the trial's values, the step budget."""
    return [sys.executable, "-m", "gptforge", "train", "-c", str(base_config), *overrides,
            f"train.max_steps={budget}", f"train.out_dir={run_dir}", "runtime.progress=false",
            "--overwrite"]


class MetricsTail:
    """The complete lines added to a ``metrics.jsonl`` since the last read (it may not exist yet,
    and its last line may be half written)."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # only whole lines; the rest is read next time
        self.offset += end
        records = []
        for line in data[:end].splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # a line cut short by a crash: nothing to learn from it
                continue
        return records


def run_trial(command: list[str], run_dir: Path, metric: str,
              should_prune: Callable[[float, int], bool]) -> Outcome:
    """Run ``command`` (its output to ``run_dir/train.log``) until it ends or is pruned.

    ``should_prune(value, step)`` is called with each new value of ``metric``.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    tail = MetricsTail(run_dir / "metrics.jsonl")
    outcome = Outcome(value=None, steps=0, seconds=0.0)
    start = time.monotonic()
    with open(run_dir / "train.log", "wb") as log_file:
        child = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
        try:
            while child.poll() is None and not outcome.pruned:
                time.sleep(POLL_SECONDS)
                outcome.pruned = _follow(tail, metric, outcome, should_prune)
        finally:
            _stop(child)
    if not outcome.pruned:
        _follow(tail, metric, outcome, lambda value, step: False)
    outcome.seconds = time.monotonic() - start
    if not outcome.pruned and child.returncode != 0:
        outcome.error = f"exit code {child.returncode}: {_last_line(run_dir / 'train.log')}"
        outcome.interrupted = child.returncode in STOPPED_BY_SIGNAL
    elif not outcome.pruned and outcome.value is None and outcome.error is None:
        outcome.error = f"the run logged no {metric} (see {run_dir / 'train.log'})"
    return outcome


def _follow(tail: MetricsTail, metric: str, outcome: Outcome, should_prune) -> bool:
    """Take in the new metrics lines; True as soon as the pruner says stop."""
    for record in tail.read():
        step = record.get("step")
        if isinstance(step, int):
            outcome.steps = max(outcome.steps, step)
        value = record.get(metric)
        if not isinstance(value, (int, float)) or not isinstance(step, int):
            continue
        if not math.isfinite(value):
            outcome.value, outcome.error = None, f"{metric} is {value} at step {step}"
            continue
        outcome.value = float(value)
        if step > 0 and should_prune(outcome.value, step):  # step 0: the untrained model
            return True
    return False


def _stop(child: subprocess.Popen) -> None:
    if child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return lines[-1].strip() if lines else "(empty log)"
