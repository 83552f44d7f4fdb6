"""`gptforge report` on a real tiny run, as a user runs it; `plot --reference`; the on-track
verdict on synthetic curves; one-line errors."""

from __future__ import annotations

import json
import sys
from html.parser import HTMLParser

import pytest

from gptforge.cli import main
from gptforge.metrics import curves, references
from gptforge.metrics.curves import Run
from gptforge.model.config import ModelConfig
from gptforge.model.gpt import GPT
from tests.conftest import prepare_corpus

TINY = ["runtime.progress=false", "runtime.device=cpu", "train.max_steps=10",
        "train.eval_interval=5", "train.sample_tokens=0"]
SECTIONS = ("Config", "Data and tokenizer", "Model", "Time and tokens", "Losses", "Curves",
            "On track?", "Eval scores", "Samples", "Machine")


@pytest.fixture(scope="module")
def run_and_evals(tmp_path_factory):
    """A tiny run (evaluated at steps 0, 5, 10) and a HellaSwag-style eval of it."""
    root = tmp_path_factory.mktemp("report")
    data = prepare_corpus(root, 200)
    run = root / "run"
    assert main(["train", "-c", "tiny", f"data.dir={data}", f"train.out_dir={run}", *TINY]) == 0
    rows = [{"activity_label": "Romeo", "ctx_a": "Juliet sees", "ctx_b": "the",
             "endings": ["moon.", "stars.", "night.", "garden."], "label": str(i % 4)}
            for i in range(4)]
    task = root / "hs.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = root / "hs.json"
    assert main(["eval", str(run), "--task", str(task), "--task-format", "hellaswag",
                 "--device", "cpu", "--no-progress", "--out", str(results)]) == 0
    return run, results


class Collector(HTMLParser):
    """Tags with their attributes, and the page's text, from a strict-enough parse."""

    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def make_report(run, tmp_path, *extra):
    out = tmp_path / "card"
    assert main(["report", str(run), "--out", str(out), *map(str, extra)]) == 0
    return (out / "report.md").read_text(), (out / "report.html").read_text(), out


@pytest.mark.slow
def test_report_of_a_tiny_run_holds_every_section_and_the_right_numbers(run_and_evals,
                                                                         tmp_path):
    run, results = run_and_evals
    markdown, page, out = make_report(run, tmp_path, "--eval", results)
    for title in SECTIONS:
        assert f"## {title}\n" in markdown and f"<h2>{title}</h2>" in page
    # The parameter count of the model the tiny preset builds (vocab from the data).
    vocab = json.loads((run.parent / "prepared" / "manifest.json").read_text())
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32,
                      vocab_size=vocab["tokenizer"]["vocab_size"])
    assert f"| parameters | {GPT(cfg).num_params():,} " in markdown
    assert f"\n{GPT(cfg).num_params() / 1e6:.2f}M parameters, 10 steps, 1,280 tokens in " \
        in markdown  # the lead paragraph: 10 steps of 4 x 32 tokens
    # The final val loss is metrics.jsonl's last evaluation (step 20).
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 5, 10]
    assert f"| final val loss | {evals[-1]['val_loss']:.4f} (step 10) |" in markdown
    best = min(evals, key=lambda r: r["val_loss"])
    assert f"| best val loss | {best['val_loss']:.4f} (step {best['step']}) |" in markdown
    # The eval scores, with the published GPT-2 figures beside HellaSwag's acc_norm.
    scored = json.loads(results.read_text())["task"]
    assert f"| acc_norm | {scored['acc_norm']:.4f}" in markdown
    assert "GPT-2 124M 0.3114" in markdown and "build-nanogpt" in markdown
    # No samples were logged (sample_tokens=0), so two were generated from the checkpoint.
    assert "Sample 1 (seed 0):" in markdown and "Sample 2 (seed 1):" in markdown
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # Self-contained HTML: it parses, and nothing is loaded from elsewhere.
    parsed = Collector()
    parsed.feed(page)
    parsed.close()
    links = [a.get(k) for _, a in parsed.tags for k in ("src", "href") if a.get(k)]
    assert links and all(link.startswith("data:image/png;base64,") for link in links)
    assert not any(link.startswith(("http://", "https://")) for link in links)
    assert "Report card: run" in "".join(parsed.text)


@pytest.mark.slow
def test_report_without_matplotlib_says_the_plots_were_skipped(run_and_evals, tmp_path,
                                                                monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    markdown, page, out = make_report(run_and_evals[0], tmp_path, "--samples", "0")
    assert "Plots skipped: matplotlib is not installed" in markdown
    assert "<img" not in page and not (out / "curves.png").exists()
    assert "Samples left out (--samples 0)." in markdown


@pytest.mark.slow
def test_eval_files_with_several_tasks_core_and_lm(run_and_evals, tmp_path):
    """The other shapes `gptforge eval --out` writes: a "tasks" list, "core", "lm"."""
    tasks = [{"task": "arc.jsonl", "format": "arc", "acc": 0.3125, "acc_stderr": 0.01,
              "acc_norm": 0.375, "acc_norm_stderr": 0.02, "examples": 16},
             {"task": "gsm.jsonl", "format": "gsm8k", "exact_match": 0.0625,
              "exact_match_stderr": 0.03, "pass@4": 0.1875}]
    data = {"checkpoint": "x", "step": 20, "tasks": tasks,
            "core": {"core": 0.0417, "tasks": []},
            "lm": {"data": "prepared", "loss": 3.25, "perplexity": 25.79, "bits_per_byte": 4.69}}
    path = tmp_path / "several.json"
    path.write_text(json.dumps(data))
    markdown = make_report(run_and_evals[0], tmp_path, "--eval", path, "--samples", "0")[0]
    for row in ("| arc.jsonl | acc | 0.3125 ± 0.0100 |", "| arc.jsonl | acc_norm | 0.3750",
                "| gsm.jsonl | exact_match | 0.0625 ± 0.0300 |", "| gsm.jsonl | pass@4 | 0.1875 |",
                "| CORE-style aggregate | core | 0.0417 | GPT-2 1.5B 0.2565 [1] |",
                "| prepared | loss | 3.2500 |", "| prepared | bits_per_byte | 4.6900 |"):
        assert row in markdown, row
    assert "[1] GPT-2 1.5B" in markdown and "nanochat" in markdown


def test_samples_logged_to_tensorboard_are_read_back(tmp_path):
    summary = pytest.importorskip("torch.utils.tensorboard")
    pytest.importorskip("tensorboard")
    from gptforge.eval.report_card import logged_samples

    writer = summary.SummaryWriter(log_dir=str(tmp_path / "tb"))
    writer.add_text("sample", "ROMEO: first", 100)
    writer.add_text("sample", "ROMEO: second\nline", 200)
    writer.close()
    assert logged_samples(tmp_path) == [(100, "ROMEO: first"), (200, "ROMEO: second\nline")]
    assert logged_samples(tmp_path / "nowhere") == []


def _eval_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("args, expected", [
    (["{tmp}/nowhere"], "no such run directory: {tmp}/nowhere"),
    (["{tmp}"], "{tmp}/config.toml not found: is {tmp} a gptforge training run directory?"),
    (["{run}", "--eval", "{bad_shape}"],
     "--eval {bad_shape}: not a results file of `gptforge eval --out`"),
    (["{run}", "--eval", "{not_json}"], "--eval {not_json}: not readable JSON"),
    (["{run}", "--eval", "{tmp}/missing.json"], "--eval {tmp}/missing.json: no such file"),
])
def test_bad_input_gives_one_line(run_and_evals, tmp_path, capsys, args, expected):
    fill = {"tmp": tmp_path, "run": run_and_evals[0],
            "bad_shape": _eval_file(tmp_path, "shape.json", json.dumps({"tasks": [{"task": "x"}]})),
            "not_json": _eval_file(tmp_path, "oops.json", "{oops")}
    code = main(["report", *[a.format(**fill) for a in args], "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 1 and out == ""
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert expected.format(**fill) in lines[0], lines
    assert not (tmp_path / "o").exists()


def _run(points, name="run", path=None):
    run = Run(name=name, path=path)
    run.evals = [{"step": s, "val_loss": v} for s, v in points]
    return run


REFERENCE = [(0, 4.0), (100, 2.5), (200, 2.0)]


@pytest.mark.parametrize("points, status, step, expected", [
    ([(0, 4.1), (100, 2.55)], "on track", 100, 2.5),       # +2%: within 5%
    ([(0, 4.1), (150, 2.5)], "behind", 150, 2.25),          # interpolated: 2.25, +11%
    ([(50, 2.5), (100, 2.2)], "ahead", 100, 2.5),           # -12%
    ([(100, 2.6), (200, 2.02), (300, 1.5)], "on track", 200, 2.0),  # past the reference: ignored
    ([(0, 4.0)], "no overlap", None, None),                 # only the initial loss
    ([(300, 1.5)], "no overlap", None, None),
])
def test_verdict_on_synthetic_curves(points, status, step, expected):
    verdict = references.compare(_run(points), _run(REFERENCE))
    assert (verdict.status, verdict.step) == (status, step)
    if expected is not None:
        assert verdict.reference_val == pytest.approx(expected)
        assert verdict.gap == pytest.approx((verdict.run_val - expected) / expected)
        assert status in verdict.sentence("x")


def test_stored_references_are_well_formed_and_match_their_preset():
    names = references.reference_names()
    assert "shakespeare_char" in names
    for name in names:
        ref = references.load_reference(name)
        steps = [s for s, _ in references.val_points(ref.run)]
        assert len(steps) >= 3 and steps == sorted(steps)
        assert references.find_reference(ref.config) is not None  # its own config matches
        assert {"command", "machine", "date"} <= set(ref.provenance)
    preset = references.load_reference("shakespeare_char")
    assert preset.match["data.corpus"] == "shakespeare" and preset.match["model.n_layer"] == 4
    other = dict(preset.config, model=dict(preset.config["model"], n_embd=64))
    assert references.find_reference(other) is None


@pytest.mark.slow
def test_plot_reference_overlays_the_stored_curve(run_and_evals, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from gptforge.metrics import plotting

    run = curves.read_run(run_and_evals[0])
    ref = references.load_reference("tiny")
    fig = plotting.draw([run], ["loss", "val_loss"], smoothing=0.0, reference=ref.run)
    drawn = [(list(line.get_xdata()), list(line.get_ydata())) for line in fig.axes[0].lines]
    series = curves.series(ref.run, "val_loss")
    assert (series.x, series.y) in drawn  # the reference's val curve, point for point
    assert any(line.get_color() == plotting.REFERENCE_COLOUR for line in fig.axes[0].lines)
    # Through the CLI: a tiny run matches no stored reference unless one is named.
    out = tmp_path / "p.png"
    assert main(["plot", str(run_and_evals[0]), "--out", str(out), "--reference"]) == 1
    assert "no stored reference curve matches" in capsys.readouterr().err
    assert main(["plot", str(run_and_evals[0]), "--out", str(out), "--reference", "tiny"]) == 0
    stdout = capsys.readouterr().out
    assert "reference: tiny" in stdout and "run: " in stdout and "the tiny reference's" in stdout
    assert out.read_bytes()[:4] == b"\x89PNG"
