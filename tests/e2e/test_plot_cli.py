"""`gptforge plot` on real tiny runs, as a user runs it, and its one-line errors."""

from __future__ import annotations

import json
import sys

import pytest

from gptforge.cli import main
from tests.conftest import prepare_corpus

pytest.importorskip("matplotlib")

pytestmark = pytest.mark.slow

TINY = ["runtime.progress=false", "runtime.device=cpu", "train.max_steps=20",
        "train.eval_interval=10", "train.sample_tokens=0"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs that differ in batch size: 4 and 8 sequences of 32 tokens a step (tiny preset)."""
    root = tmp_path_factory.mktemp("plot")
    data = prepare_corpus(root, 600)
    made = []
    for name, batch in (("base", 4), ("big_batch", 8)):
        run = root / name
        assert main(["train", "-c", "tiny", f"data.dir={data}", f"train.out_dir={run}",
                     f"train.batch_size={batch}", *TINY]) == 0
        made.append(run)
    return made


def plot(args, capsys):
    code = main(["plot", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def test_two_runs_make_a_png_that_is_not_blank(runs, tmp_path, capsys):
    from matplotlib.image import imread

    out = tmp_path / "x.png"
    code, stdout, _ = plot([*runs, "--out", out], capsys)
    assert code == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    pixels = imread(out)  # (H, W, RGBA) floats in [0, 1]
    assert pixels.shape[0] > 300 and pixels.shape[1] > 300
    assert pixels[..., :3].std() > 0.05  # curves, axes and text on white, not one flat colour
    # the summary: one row per run, 20 steps of 4 or 8 sequences of 32 tokens
    rows = {line.split()[0]: line.split() for line in stdout.splitlines()[1:]}
    assert rows["base"][1:3] == ["20", "2,560"]
    assert rows["big_batch"][1:3] == ["20", "5,120"]
    assert "(20)" in rows["base"] or "(10)" in rows["base"]  # best val loss at an eval step


def test_svg_holds_the_run_names_and_tokens_axis(runs, tmp_path, capsys):
    out = tmp_path / "cmp.svg"
    code, _, _ = plot([*runs, "--out", out, "--x", "tokens", "--metrics", "loss,val_loss",
                       "--smooth", "0.9", "--log-y", "--title", "batch size"], capsys)
    assert code == 0
    svg = out.read_text()
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg
    for text in ("base", "big_batch", "tokens", "batch size"):
        assert f">{text}<" in svg, text


def test_time_axis_from_the_logged_wall_clock(runs, tmp_path, capsys):
    from gptforge.metrics.sinks import read_metrics

    seconds = [r["elapsed_sec"] for r in read_metrics(runs[0] / "metrics.jsonl") if "loss" in r]
    assert seconds == sorted(seconds) and seconds[0] > 0  # logged by training, never decreasing
    out = tmp_path / "time.svg"
    assert plot([*runs, "--out", out, "--x", "time"], capsys)[0] == 0
    assert ">training time (s)<" in out.read_text()


def test_pdf_and_a_cut_short_line(runs, tmp_path, capsys, caplog):
    run = tmp_path / "crashed"
    run.mkdir()
    text = (runs[0] / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text + '{"step": 21, "loss": 2.')  # a crash mid-write
    out = tmp_path / "one.pdf"
    code, stdout, _ = plot([run, "--out", out, "--smooth", "0"], capsys)
    assert code == 0 and out.read_bytes()[:5] == b"%PDF-"
    assert "cut short" in caplog.text
    assert stdout.splitlines()[1].split()[:2] == ["crashed", "20"]


def test_events_are_drawn(tmp_path, capsys):
    run = tmp_path / "bumpy"
    run.mkdir()
    lines = [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3, "grad_norm": 1.0,
              "tokens_per_sec": 1000.0, "mfu": 0.1, "tokens": 64 * s} for s in range(1, 9)]
    lines.insert(4, {"step": 6, "event": "rollback", "reason": "loss spiked", "lr_scale": 0.5})
    lines.append({"step": 8, "val_loss": 2.5, "val_ppl": 12.2})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "bumpy.svg"
    assert plot([run, "--out", out], capsys)[0] == 0
    assert ">rollback<" in out.read_text()  # its entry in the legend


@pytest.mark.parametrize("args, expected", [
    (["{tmp}/nowhere"], "no such run directory: {tmp}/nowhere"),
    (["{tmp}/empty"], "{tmp}/empty/metrics.jsonl holds no metrics"),
    (["{run}", "--metrics", "loss,accuracy"],
     "unknown metric accuracy; these runs logged: grad_norm, loss, lr, mfu, tokens_per_sec, "
     "val_loss, val_ppl"),
    (["{run}", "--out", "{tmp}/x.jpg"], "--out must end in .png, .svg, .pdf"),
    (["{run}", "--smooth", "1", "--out", "{tmp}/t.png"], "--smooth must be at least 0 and below 1"),
    (["{run}", "--out", "{tmp}/empty/metrics.jsonl/x.png"],
     "{tmp}/empty/metrics.jsonl is a file, not a directory"),
])
def test_bad_input_gives_one_line(runs, tmp_path, capsys, args, expected):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    fill = {"tmp": tmp_path, "run": runs[0]}
    code, stdout, err = plot([a.format(**fill) for a in args], capsys)
    assert code == 1 and stdout == ""
    assert len(err) == 1 and err[0].startswith("error: ") and expected.format(**fill) in err[0], err
    assert not list(tmp_path.glob("*.png"))


def test_without_matplotlib_it_says_what_to_install(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    code, _, err = plot([runs[0], "--out", tmp_path / "x.png"], capsys)
    assert code == 1
    assert err == ["error: plotting needs matplotlib: pip install 'gptforge[plot]'"]
