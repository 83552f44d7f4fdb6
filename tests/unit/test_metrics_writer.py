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


def test_flush_writes_at_once_whatever_the_interval(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False, interval=3600.0)
    writer.log({"step": 1, "loss": 2.0})
    writer.flush()  # wakes the thread: no waiting for the hour
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.0}]
    writer.close()


def test_tensorboard_reads_back_every_scalar_of_every_record(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = MetricsWriter(tmp_path, tensorboard=True)
    for step in range(1, 6):
        writer.log({"step": step, "loss": 1.0 / step, "lr": 1e-3 * step, "nan": float("nan")})
    writer.log({"step": 5, "val_loss": 0.75})
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "lr", "val_loss"]
    loss = [(e.step, e.value) for e in events.Scalars("loss")]
    assert loss == [(s, pytest.approx(1.0 / s)) for s in range(1, 6)]
    assert [e.value for e in events.Scalars("val_loss")] == [0.75]
