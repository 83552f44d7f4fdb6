"""The data side of `gptforge plot`: reading runs, series, EMA smoothing, summary numbers.

Expected values are worked out by hand from the hand-written metrics file below.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from gptforge.errors import GptforgeError
from gptforge.metrics import curves

LINES = [
    {"step": 0, "val_loss": 5.0, "val_ppl": 148.4},
    {"step": 1, "loss": 4.0, "lr": 0.001, "grad_norm": 2.0, "tokens_per_sec": 10.0, "mfu": 0.01,
     "tokens": 100},
    {"step": 2, "loss": 3.0, "lr": 0.002, "grad_norm": None, "tokens_per_sec": 100.0, "mfu": 0.2,
     "tokens": 200},
    {"step": 2, "val_loss": 3.5, "val_ppl": 33.1},
    {"step": 3, "event": "skip", "reason": "loss spiked", "lr_scale": 1.0},
    {"step": 4, "loss": 2.0, "lr": 0.002, "grad_norm": 1.0, "tokens_per_sec": 50.0, "mfu": 0.1,
     "tokens": 300},
    {"step": 4, "val_loss": 3.3, "val_ppl": 27.1},
    {"step": 6, "val_loss": 3.4, "val_ppl": 30.0},  # an evaluation after the last training line
]


def write_run(root, name="run", lines=LINES, tail=""):
    run = root / name
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + tail)
    return run


@pytest.fixture
def run(tmp_path):
    return curves.read_run(write_run(tmp_path))


def test_ema_matches_a_hand_computation_with_debiasing():
    # w = 0.5 over [1, 2, 3]: raw EMA from 0 is 0.5, 1.25, 2.125; the weight given so far is
    # 1 - 0.5**t = 0.5, 0.75, 0.875, and dividing by it gives 1, 5/3, 17/7.
    assert curves.ema([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 5 / 3, 17 / 7])
    # Debiased, each point is the mean of the values so far weighted w**age: (1*.25+2*.5+3)/1.75.
    assert curves.ema([1.0, 2.0, 3.0], 0.5)[-1] == pytest.approx((0.25 + 1.0 + 3.0) / 1.75)
    # A constant curve stays constant from the first point (without debiasing it would rise
    # from 0.1 towards 1).
    assert curves.ema([1.0] * 5, 0.9) == pytest.approx([1.0] * 5)
    assert curves.ema([3.0, 1.0, 2.0], 0.0) == [3.0, 1.0, 2.0]
    assert curves.ema([], 0.6) == []
    with pytest.raises(GptforgeError):
        curves.ema([1.0], 1.0)


def test_lines_are_sorted_into_training_evaluation_and_events(run):
    assert run.name == "run"
    assert [r["step"] for r in run.train] == [1, 2, 4]
    assert [r["step"] for r in run.evals] == [0, 2, 4, 6]
    assert [(r["step"], r["event"]) for r in run.events] == [(3, "skip")]
    assert run.metrics() == {"loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "val_loss",
                             "val_ppl"}


def test_series_against_steps_and_tokens(run):
    loss = curves.series(run, "loss")
    assert (loss.x, loss.y) == ([1, 2, 4], [4.0, 3.0, 2.0])
    grad = curves.series(run, "grad_norm")  # a null (a non-finite value) is left out
    assert (grad.x, grad.y) == ([1, 4], [2.0, 1.0])
    val = curves.series(run, "val_loss", x="tokens")
    # Eval lines carry no tokens: step 0 is 0 tokens, steps 2 and 4 are logged (200, 300), and
    # step 6, past the last training line, continues the last slope of 50 tokens a step.
    assert val.x == pytest.approx([0, 200, 300, 400])
    assert val.y == [5.0, 3.5, 3.3, 3.4]
    # the skipped step 3 lies halfway between the lines of steps 2 and 4
    assert curves.event_positions(run, "tokens") == [(pytest.approx(250), "skip")]
    assert curves.event_positions(run, "step") == [(3, "skip")]


def test_only_noisy_training_curves_are_smoothed(run):
    assert curves.smoothable("loss", run) and curves.smoothable("grad_norm", run)
    assert not curves.smoothable("val_loss", run)
    assert not curves.smoothable("lr", run)  # a setting, not a measurement


def test_summary_numbers(run):
    s = curves.summarize(run, smoothing=0.5)
    assert (s.last_step, s.tokens) == (6, 300)
    # EMA 0.5 of the losses 4, 3, 2 ends at (0.25*4 + 0.5*3 + 2) / 1.75
    assert s.final_loss == pytest.approx(4.5 / 1.75)
    assert (s.best_val_loss, s.best_val_step) == (3.3, 4)
    # Windows: 100 tokens at 10/s (10 s, start-up, left out), 100 at 100/s (1 s), 100 at 50/s
    # (2 s): 200 tokens in 3 s. MFU weighted by those seconds: (1*0.2 + 2*0.1) / 3.
    assert s.tokens_per_sec == pytest.approx(200 / 3)
    assert s.mfu == pytest.approx(0.4 / 3)
    table = curves.format_summary([s], 0.5)
    assert "train loss (EMA 0.5)" in table
    row = table.splitlines()[1].split()
    assert row[:4] == ["run", "6", "300", "2.5714"] and "3.3000 (4)" in table


def test_summary_of_a_run_without_evaluations_or_throughput(tmp_path):
    lines = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
    s = curves.summarize(curves.read_run(write_run(tmp_path, lines=lines)), smoothing=0.0)
    assert (s.final_loss, s.best_val_loss, s.tokens, s.tokens_per_sec, s.mfu) == \
        (1.0, None, None, None, None)
    assert curves.format_summary([s], 0.0).splitlines()[1].split() == \
        ["run", "2", "-", "1.0000", "-", "-", "-"]


def test_a_last_line_cut_short_is_dropped_with_a_warning(tmp_path, caplog):
    path = write_run(tmp_path, tail='{"step": 7, "loss": 3.1, "l')
    with caplog.at_level(logging.WARNING):
        run = curves.read_run(path)
    assert "line 9 is cut short" in caplog.text
    assert [r["step"] for r in run.train] == [1, 2, 4]


def test_a_bad_line_inside_the_file_is_an_error_naming_it(tmp_path):
    path = write_run(tmp_path)
    text = (path / "metrics.jsonl").read_text().splitlines()
    text[2] = "{oops"
    (path / "metrics.jsonl").write_text("\n".join(text) + "\n")
    with pytest.raises(GptforgeError, match="metrics.jsonl line 3 is not valid JSON"):
        curves.read_run(path)
    (path / "metrics.jsonl").write_text('{"loss": 1.0}\n')
    with pytest.raises(GptforgeError, match="line 1 is not a metrics record"):
        curves.read_run(path)


def test_missing_and_empty_runs_are_errors_naming_the_path(tmp_path):
    with pytest.raises(GptforgeError, match="no such run directory: .*nowhere"):
        curves.read_run(tmp_path / "nowhere")
    (tmp_path / "bare").mkdir()
    with pytest.raises(GptforgeError, match="bare/metrics.jsonl not found"):
        curves.read_run(tmp_path / "bare")
    empty = write_run(tmp_path, "empty", lines=[], tail="\n")
    with pytest.raises(GptforgeError, match="empty/metrics.jsonl holds no metrics"):
        curves.read_run(empty)


def test_a_metrics_file_can_be_named_instead_of_its_run(tmp_path):
    run = curves.read_run(write_run(tmp_path, "named") / "metrics.jsonl")
    assert run.name == "named" and len(run.train) == 3


def test_labels_add_parent_folders_only_where_names_clash(tmp_path):
    a, b, c = (write_run(tmp_path, p) for p in ("a/base", "b/base", "a/lr3e-3"))
    assert curves.run_labels([a, b, c]) == ["a/base", "b/base", "lr3e-3"]
    assert curves.run_labels([c, c]) == ["lr3e-3", "lr3e-3"]  # the same run twice


def test_default_and_requested_metrics(run, tmp_path):
    assert curves.resolve_metrics([run], None) == ["loss", "val_loss", "lr", "grad_norm",
                                                   "tokens_per_sec", "mfu"]
    no_peak = [{**r, "mfu": 0.0} if "loss" in r else r for r in LINES]  # MFU unknown: all 0
    other = curves.read_run(write_run(tmp_path, "other", lines=no_peak))
    assert "mfu" not in curves.resolve_metrics([other], None)
    assert curves.resolve_metrics([run], ["val_ppl", "loss", "val_ppl"]) == ["val_ppl", "loss"]
    with pytest.raises(GptforgeError) as err:
        curves.resolve_metrics([run], ["loss", "reward_margin"])
    assert "unknown metric reward_margin" in str(err.value)
    assert "grad_norm, loss, lr, mfu, tokens_per_sec, val_loss, val_ppl" in str(err.value)


def test_val_metrics_share_the_panel_of_their_training_metric():
    assert curves.panels(["loss", "val_loss", "lr"]) == [["loss", "val_loss"], ["lr"]]
    assert curves.panels(["val_loss", "grad_norm", "loss"]) == [["loss", "val_loss"],
                                                               ["grad_norm"]]
    assert curves.panels(["val_ppl", "reward_margin", "val_reward_margin"]) == \
        [["val_ppl"], ["reward_margin", "val_reward_margin"]]


def test_time_axis_needs_a_wall_clock_field(run, tmp_path):
    with pytest.raises(GptforgeError, match="before gptforge logged wall-clock time"):
        curves.check_x([run], "time")
    timed = [{**r, "elapsed_sec": 2.0 * r["step"]} if "loss" in r else r for r in LINES]
    timed_run = curves.read_run(write_run(tmp_path, "timed", lines=timed))
    curves.check_x([timed_run], "time")
    assert curves.series(timed_run, "val_loss", x="time").x == pytest.approx([0, 4, 8, 12])


def test_importing_the_cli_and_the_data_side_does_not_import_matplotlib():
    code = ("import sys, gptforge.metrics.curves, gptforge.cli; gptforge.cli.build_parser(); "
            "assert 'matplotlib' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
