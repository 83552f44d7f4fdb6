"""Metric sinks: one JSON object per line in ``RUN_DIR/metrics.jsonl``, and TensorBoard.

``metrics.jsonl`` is the source of truth for plots and comparisons: training lines carry
``step, loss, lr, tokens_per_sec, mfu`` (and more), evaluation lines ``step, val_loss, val_ppl``.
On resume, lines logged after the checkpoint (by a run that crashed later) are dropped, so the file
reads as one uninterrupted run.

Writing is kept off the training loop's hot path: ``MetricsWriter.log`` only queues the record, and
a background thread wakes every ``interval`` seconds (or when flushed) to write everything queued at
once: the lines appended to ``metrics.jsonl`` in one write, one TensorBoard event per record (all
its scalars in one summary), and wandb. Waking once a second matters more than it seems: a thread
that runs Python while the trainer does holds the GIL for up to 5 ms at a time, and on a 2-core
CPU it also takes a core from the step's OpenMP threads. Written per record with ``add_scalar``,
TensorBoard cost 3 ms of a 26 ms step at ``log_interval=1`` (4 layers, 128 wide;
docs/benchmarks.md).
``flush()`` wakes the thread and waits until everything queued is written; the trainer calls it
before each checkpoint, so the file is durable up to the checkpoint's step, and ``close()`` flushes
too.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

from gptforge import atomic
from gptforge.errors import GptforgeError

log = logging.getLogger(__name__)


def truncate_after(path: Path, step: int) -> None:
    """Keep only the lines of a metrics file whose step is <= ``step``."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    atomic.write_text(path, "".join(f"{line}\n" for line in kept))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def start_wandb(run_dir: Path, project: str, config: dict | None):
    """A Weights & Biases run that a resumed training continues (same id, kept in RUN_DIR).

    ``WANDB_MODE=offline`` works as usual: the run is recorded locally for ``wandb sync``.
    """
    try:
        import wandb
    except ImportError:
        raise GptforgeError("runtime.wandb_project is set but wandb is not installed; "
                            "pip install 'gptforge[wandb]'") from None
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
    atomic.write_text(id_file, run_id + "\n")
    return wandb.init(project=project, id=run_id, resume="allow", name=run_dir.name,
                      dir=str(run_dir), config=config)


class MetricsWriter:
    """metrics.jsonl (always), TensorBoard and wandb (if asked), written by a background thread
    in batches, every ``interval`` seconds and on ``flush()``/``close()``."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, wandb_project: str = "",
                 config: dict | None = None, interval: float = 1.0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = self.path.open("a", encoding="utf-8")
        self.wandb = start_wandb(Path(run_dir), wandb_project, config) if wandb_project else None
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
            except ImportError:
                log.warning("tensorboard is not installed; writing metrics.jsonl only")
        self.interval = interval
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._wake = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="gptforge-metrics", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        running = True
        while running:
            self._wake.wait(self.interval)
            self._wake.clear()
            batch = []
            while True:  # everything queued so far
                try:
                    batch.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            for job in batch:
                try:
                    if job is None:
                        running = False
                    elif self._error is None:
                        job()
                except BaseException as err:  # noqa: BLE001 - raised in the trainer's thread
                    self._error = err
            try:
                if self._error is None and batch:
                    self.file.flush()
            except BaseException as err:  # noqa: BLE001
                self._error = err
            for _ in batch:
                self._jobs.task_done()

    def _submit(self, job: Callable[[], None]) -> None:
        if self._error is not None:
            self._raise()
        self._jobs.put(job)

    def _raise(self) -> None:
        error, self._error = self._error, None
        raise GptforgeError(f"writing the metrics of {self.path.parent} failed: {error}")

    def log(self, record: dict) -> None:
        self._submit(lambda: self._write(dict(record)))

    def _write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        numbers = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        if self.tb is not None and numbers:
            # One event holding every scalar of the record: what add_scalar writes per scalar,
            # at a fifth of the cost (tensorboard reads both the same way).
            from tensorboard.compat.proto.summary_pb2 import Summary

            values = [Summary.Value(tag=k, simple_value=float(v)) for k, v in numbers.items()]
            self.tb.file_writer.add_summary(Summary(value=values), record["step"])
        if self.wandb is not None:
            self.wandb.log(numbers, step=record["step"])

    def flush(self) -> None:
        """Wait until every queued record is written (before a checkpoint, a rollback, exit)."""
        self._wake.set()
        self._jobs.join()
        if self._error is not None:
            self._raise()

    def reopen(self) -> None:
        """Continue in the file now at ``path`` (after :func:`truncate_after` replaced it)."""
        self.flush()
        self.file.close()
        self.file = self.path.open("a", encoding="utf-8")

    def text(self, tag: str, text: str, step: int) -> None:
        if self.tb is not None:
            self._submit(lambda: self.tb.add_text(tag, text, step))

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._jobs.put(None)
            self._wake.set()
            self._thread.join()
            self.file.close()
            if self.tb is not None:
                self.tb.close()
            if self.wandb is not None:
                self.wandb.finish()


class NullWriter:
    """The writer of ranks other than 0: only rank 0 records metrics."""

    def log(self, record: dict) -> None:
        pass

    def flush(self) -> None:
        pass

    def text(self, tag: str, text: str, step: int) -> None:
        pass

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass
