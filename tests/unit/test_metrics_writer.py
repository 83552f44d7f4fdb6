"""metrics/sinks.py MetricsWriter: records are written by a background thread, in order,
complete after flush() and close(); a failure there surfaces in the trainer's thread."""

from __future__ import annotations

import pytest

from gptforge.errors import GptforgeError
from gptforge.metrics.sinks import MetricsWriter, read_metrics


def test_records_are_all_written_in_order_by_flush_and_close(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    for step in range(200):
        writer.log({"step": step, "loss": 1.0 / (step + 1), "bad": float("nan")})
    writer.flush()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(200)) and records[0]["bad"] is None
    writer.log({"step": 200, "loss": 0.5})
    writer.close()
    assert read_metrics(tmp_path / "metrics.jsonl")[-1] == {"step": 200, "loss": 0.5}


def test_a_failed_write_is_raised_in_the_callers_thread(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.file.close()  # the next write fails in the background thread
    writer.log({"step": 1, "loss": 1.0})
    with pytest.raises(GptforgeError, match="writing the metrics"):
        writer.flush()
    writer.file = (tmp_path / "other.jsonl").open("a")
    writer.close()
