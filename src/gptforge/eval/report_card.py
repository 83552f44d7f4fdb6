"""The report card of a training run: one page that says what was trained, how, and how well.

``gptforge report RUN_DIR`` gathers what a run left behind and what ``gptforge eval --out``
wrote about it into one Markdown page and one self-contained HTML page (plots embedded as base64
PNG, no external assets, so the file can be mailed or attached as it is):

- the resolved config (``RUN_DIR/config.toml``), its key settings first;
- the data: the prepared directory's manifest (tokenizer kind, vocabulary, tokens per split,
  sources), or the checkpoint's copy of the tokenizer entry where the data is not on this machine;
- the model's parameter count and training FLOPs per token (:meth:`GPT.flops_per_token`);
- time and tokens, losses, and the curves (:mod:`gptforge.metrics.plotting`, when matplotlib is
  installed), with the verdict against the preset's stored reference curve
  (:mod:`gptforge.metrics.references`);
- eval scores beside published scores of reference models (``references.toml``, each cited);
- samples: those the run logged to TensorBoard, else two generated from the latest checkpoint;
- the machine the report was made on.

The page is built as a list of :class:`Section` of a few block kinds, rendered twice, so that the
Markdown and the HTML always say the same thing.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
import platform
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from gptforge import __version__, atomic
from gptforge.checkpoints.format import latest_checkpoint, model_config_of, read_meta
from gptforge.data.manifest import Manifest
from gptforge.errors import GptforgeError
from gptforge.metrics import curves, plotting, references
from gptforge.metrics.curves import Run
from gptforge.model.config import ModelConfig
from gptforge.model.gpt import GPT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Shown first in the config section: the settings a reader asks about before any other.
KEY_SETTINGS = ("data.dir", "data.tokenizer", "model.n_layer", "model.n_head", "model.n_embd",
                "model.block_size", "model.vocab_size", "model.dropout", "train.max_steps",
                "train.batch_size", "train.grad_accum", "optim.name", "optim.lr",
                "optim.weight_decay", "schedule.name", "schedule.warmup_steps", "train.seed")
SAMPLES = 2
SAMPLE_TOKENS = 200
CURVES_FILE = "curves.png"


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Code:
    text: str
    summary: str = ""  # HTML: folded under this line (<details>), for long blocks


@dataclass
class Image:
    png: bytes
    file: str  # written beside report.md, which links it
    alt: str


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)  # str (a paragraph), Table, Code or Image


@dataclass
class Report:
    title: str
    lead: str  # one paragraph under the title: the figures a reader wants first
    sections: list[Section]


def build_report(run_dir: str | Path, eval_paths: list[str | Path] = (), *,
                 samples: int = SAMPLES) -> Report:
    """Gather every section of the report card of ``run_dir``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GptforgeError(f"no such run directory: {run_dir}")
    config = references.run_config(run_dir)
    run = curves.read_run(run_dir)
    evals = [read_eval(Path(p)) for p in eval_paths]  # checked before any slow work
    model_cfg = _model_config(run_dir, config)
    reference = references.find_reference(config)
    sections = [_config_section(config, run_dir), _data_section(config, run_dir),
                _model_section(model_cfg), _time_section(run), _loss_section(run),
                _curves_section(run, reference), _reference_section(run, config, reference),
                _eval_section(evals), _samples_section(run_dir, config, samples),
                _machine_section(config)]
    return Report(f"Report card: {run_dir.resolve().name}", _lead(model_cfg, run, reference),
                  sections)


def _lead(model_cfg: ModelConfig, run: Run, reference) -> str:
    with torch.device("meta"):
        params = GPT(model_cfg).num_params()
    summary, losses = curves.summarize(run, smoothing=0.0), final_losses(run)
    seconds = _last(run, "elapsed_sec")
    parts = [f"{params / 1e6:.2f}M parameters, {summary.last_step:,} steps"]
    if summary.tokens is not None:
        parts.append(f"{summary.tokens:,} tokens")
    text = ", ".join(parts) + (f" in {_duration(seconds)}" if seconds is not None else "")
    if losses["final_val"] is not None:
        text += (f"; final val loss {losses['final_val']:.4f}, best {losses['best_val']:.4f} "
                 f"at step {losses['best_val_step']:,}")
    if reference is not None:
        text += f". Against the stored reference: {references.compare(run, reference.run).status}"
    return text + "."


# --- config, data, model ---------------------------------------------------------------------

def _config_section(config: dict, run_dir: Path) -> Section:
    rows = [[key, _cell(references.setting(config, key))] for key in KEY_SETTINGS
            if references.setting(config, key) is not None]
    text = (run_dir / "config.toml").read_text(encoding="utf-8")
    return Section("Config", [f"Resolved config of the run (`{run_dir}/config.toml`); "
                              "key settings first, the whole file below.",
                              Table(["setting", "value"], rows),
                              Code(text.strip(), summary="config.toml")])


def _cell(value) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value)


def _data_section(config: dict, run_dir: Path) -> Section:
    mixture = references.setting(config, "data.mixture") or ""
    dirs = [item.rsplit(":", 1)[0] for item in mixture.split(",") if item.strip()] or \
        [references.setting(config, "data.dir")]
    section = Section("Data and tokenizer")
    for data_dir in dirs:
        if (Path(data_dir) / "manifest.json").is_file():
            section.blocks += _manifest_blocks(Manifest.read(data_dir))
        else:
            section.blocks.append(f"`{data_dir}`: not found on this machine; the tokenizer as "
                                  "the checkpoint recorded it:")
            section.blocks.append(_checkpoint_tokenizer(run_dir))
    return section


def _manifest_blocks(manifest: Manifest) -> list:
    tok = manifest.tokenizer
    rows = [["data directory", str(manifest.dir)], ["tokenizer", tok.kind],
            ["vocabulary", f"{tok.vocab_size:,}"], ["token dtype", manifest.token_dtype]]
    rows += [[f"{split} tokens", f"{n:,}"] for split, n in manifest.split_tokens.items()]
    sources = manifest.raw.get("sources") or []
    names = [str(s.get("path") or s.get("hf") or s) if isinstance(s, dict) else str(s)
             for s in sources]
    if names:
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        rows.append(["sources", ", ".join(names[:3]) + more])
    return [Table(["", "value"], rows)]


def _checkpoint_tokenizer(run_dir: Path):
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return "no checkpoint either: nothing is known about the tokenizer."
    tok = read_meta(ckpt).get("tokenizer", {})
    rows = [[k, _cell(tok[k])] for k in ("kind", "vocab_size", "sha256") if k in tok]
    return Table(["", "value"], rows)


def _model_config(run_dir: Path, config: dict) -> ModelConfig:
    """The architecture as trained: the latest checkpoint's record, else the saved config."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        return model_config_of(read_meta(ckpt), ckpt)
    try:
        return ModelConfig.from_dict(config.get("model", {}))
    except (TypeError, ValueError) as err:
        raise GptforgeError(f"{run_dir}/config.toml: invalid [model] section ({err})") from None


def _model_section(model_cfg: ModelConfig) -> Section:
    # On the meta device: the shapes are all that counting needs, no memory is used.
    with torch.device("meta"):
        model = GPT(model_cfg)
    total, active = model.num_params(), model.num_active_params()
    rows = [["parameters", f"{total:,} ({total / 1e6:.2f}M)"],
            ["parameters without the position table",
             f"{model.num_params(exclude_embeddings=True):,}"],
            ["training FLOPs per token", f"{model.flops_per_token():,} "
             f"(forward + backward at context {model_cfg.block_size})"],
            ["layers x width, heads", f"{model_cfg.n_layer} x {model_cfg.n_embd}, "
             f"{model_cfg.n_head} heads"]]
    if active != total:
        rows.insert(1, ["active parameters per token", f"{active:,}"])
    return Section("Model", [Table(["", "value"], rows)])


# --- time, losses, curves, reference ---------------------------------------------------------

def _last(run: Run, key: str) -> float | None:
    """The last finite value of a training field (``elapsed_sec``, ``loss``) in the run."""
    values = curves.series(run, key).y
    return values[-1] if values else None


def _time_section(run: Run) -> Section:
    summary = curves.summarize(run, smoothing=0.0)
    seconds = _last(run, "elapsed_sec")
    rows = [["steps", f"{summary.last_step:,}"],
            ["tokens seen", "-" if summary.tokens is None else f"{summary.tokens:,}"],
            ["training time", "-" if seconds is None else _duration(seconds)],
            ["throughput", "-" if summary.tokens_per_sec is None
             else f"{summary.tokens_per_sec:,.0f} tokens/s"]]
    if summary.mfu:
        rows.append(["MFU", f"{summary.mfu:.1%}"])
    return Section("Time and tokens", [Table(["", "value"], rows)])


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d} ({seconds:,.1f} s)"


def final_losses(run: Run) -> dict:
    """``final_train``, ``best_val`` (with ``best_val_step``) and ``final_val`` (with
    ``final_val_step``) of a run, None where it logged none."""
    train = curves.series(run, "loss")
    vals = references.val_points(run)
    best = min(vals, key=lambda p: (p[1], p[0])) if vals else (None, None)
    return {"final_train": train.y[-1] if train.y else None,
            "final_train_step": int(train.x[-1]) if train.x else None,
            "best_val": best[1], "best_val_step": best[0],
            "final_val": vals[-1][1] if vals else None,
            "final_val_step": vals[-1][0] if vals else None}


def _loss_section(run: Run) -> Section:
    losses = final_losses(run)

    def at(value_key: str, step_key: str) -> str:
        value = losses[value_key]
        return "-" if value is None else f"{value:.4f} (step {losses[step_key]:,})"

    rows = [["final train loss", at("final_train", "final_train_step")],
            ["best val loss", at("best_val", "best_val_step")],
            ["final val loss", at("final_val", "final_val_step")]]
    return Section("Losses", [Table(["", "value"], rows)])


def _curves_section(run: Run, reference) -> Section:
    if not plotting.available():
        return Section("Curves", ["Plots skipped: matplotlib is not installed "
                                  "(pip install 'gptforge[plot]')."])
    metrics = curves.resolve_metrics([run], None)
    fig = plotting.draw([run], metrics, reference=reference.run if reference else None)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    note = f" The near-black curve is the stored {reference.name} reference." if reference else ""
    return Section("Curves", [f"Training curves from metrics.jsonl (EMA 0.6 on training "
                              f"curves).{note}",
                              Image(buffer.getvalue(), CURVES_FILE, "training curves")])


def _reference_section(run: Run, config: dict, reference) -> Section:
    section = Section("On track?")
    if reference is None:
        section.blocks.append(
            "No stored reference curve matches this run's corpus, tokenizer and model shape "
            f"(stored: {', '.join(references.reference_names())}; presets that need a GPU, "
            "such as gpt2_124m, have none).")
        return section
    verdict = references.compare(run, reference.run)
    prov = reference.provenance
    sentence = verdict.sentence(reference.name)
    section.blocks.append(sentence[0].upper() + sentence[1:] + ".")
    section.blocks.append(f"The reference: `{prov.get('command', '?')}` on "
                          f"{prov.get('machine', '?')}, {prov.get('date', '?')}.")
    if verdict.status in ("behind", "ahead"):
        differences = references.config_differences(config, reference)
        if differences:
            section.blocks.append(Table(["setting", "this run", "reference"],
                                        [[k, _cell(a), _cell(b)] for k, a, b in differences]))
        section.blocks.append("What usually causes a gap: " +
                              "; ".join(references.GAP_CAUSES) + ".")
    return section


# --- eval scores -----------------------------------------------------------------------------

def read_eval(path: Path) -> dict:
    """A ``gptforge eval --out`` JSON file, checked for the shape the report reads."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GptforgeError(f"--eval {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GptforgeError(f"--eval {path}: not readable JSON ({err})") from None
    tasks = _eval_tasks(data) if isinstance(data, dict) else None
    if tasks is None or not (tasks or "lm" in data or "core" in data):
        raise GptforgeError(f"--eval {path}: not a results file of `gptforge eval --out` (a "
                            "JSON object with 'task', 'tasks', 'lm' or 'core'); write one with "
                            "gptforge eval RUN --task ... --out FILE.json")
    return {**data, "_path": str(path), "_tasks": tasks}


def _eval_tasks(data: dict) -> list[dict] | None:
    """The scored tasks of an eval file ("task": one, "tasks": several); None if malformed."""
    tasks = [data["task"]] if "task" in data else data.get("tasks", [])
    if not isinstance(tasks, list):
        return None
    for task in tasks:
        numbers = [k for k in ("acc", "exact_match") if isinstance(task.get(k), (int, float))] \
            if isinstance(task, dict) else []
        if not numbers or not isinstance(task.get("task"), str):
            return None
    return tasks


def published_scores() -> list[dict]:
    """The cited scores of reference models in ``references.toml``."""
    text = resources.files("gptforge").joinpath("eval", "references.toml").read_text("utf-8")
    return tomllib.loads(text)["score"]


def _eval_section(evals: list[dict]) -> Section:
    if not evals:
        return Section("Eval scores", ["No eval results given (`gptforge report RUN --eval "
                                       "FILE.json`, from `gptforge eval RUN ... --out "
                                       "FILE.json`)."])
    published, cited = published_scores(), []
    rows = []
    for data in evals:
        for task, metric, value, stderr in _scores(data):
            refs = [p for p in published if p["benchmark"] == task.get("format", task["task"])
                    and p["metric"] == metric]
            notes = []
            for p in refs:
                if p not in cited:
                    cited.append(p)
                notes.append(f"{p['model']} {p['value']:.4f} [{cited.index(p) + 1}]")
            rows.append([Path(data["_path"]).name, str(data.get("step", "-")), task["task"],
                         metric, f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr else ""),
                         "; ".join(notes) or "-"])
    blocks = [Table(["file", "step", "task", "metric", "score", "published"], rows)]
    if cited:
        blocks.append("Sources of the published scores: " + " ".join(
            f"[{i}] {p['model']}, {p['setting']}: {p['source']}, {p['url']}."
            for i, p in enumerate(cited, 1)))
    return Section("Eval scores", blocks)


def _scores(data: dict):
    """``(task, metric, value, stderr)`` for every score in one eval file."""
    if "lm" in data:
        lm = data["lm"]
        task = {"task": str(lm.get("data") or ", ".join(lm.get("text", []))), "format": "lm"}
        for metric in ("loss", "perplexity", "bits_per_byte"):
            if isinstance(lm.get(metric), (int, float)):
                yield task, metric, lm[metric], None
    for task in data["_tasks"]:
        for metric in ("acc", "acc_norm", "exact_match"):
            if isinstance(task.get(metric), (int, float)):
                yield task, metric, task[metric], task.get(f"{metric}_stderr")
        for metric in (k for k in task if k.startswith("pass@")):
            yield task, metric, task[metric], None
    if isinstance(data.get("core"), dict):
        yield {"task": "CORE-style aggregate", "format": "core"}, "core", data["core"]["core"], \
            None


# --- samples, machine ------------------------------------------------------------------------

def logged_samples(run_dir: Path) -> list[tuple[int, str]]:
    """``(step, text)`` of the samples the run logged to TensorBoard (empty without it)."""
    tb = run_dir / "tb"
    if not tb.is_dir():
        return []
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        from tensorboard.util.tensor_util import make_ndarray
    except ImportError:
        return []
    tb_log = logging.getLogger("tensorboard")
    if tb_log.level == logging.NOTSET:  # its INFO lines ("No path found after ...") are noise
        tb_log.setLevel(logging.WARNING)
    events = EventAccumulator(str(tb), size_guidance={"tensors": 0})
    events.Reload()
    tags = [t for t in events.Tags().get("tensors", []) if t.startswith("sample")]
    found = [(e.step, make_ndarray(e.tensor_proto).item()) for tag in tags
             for e in events.Tensors(tag)]
    return [(step, text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text))
            for step, text in sorted(found, key=lambda p: p[0])]


def generated_samples(run_dir: Path, prompt: str, n: int) -> list[str]:
    """``n`` samples from the latest checkpoint, seeded 0..n-1, so a report is reproducible."""
    from gptforge import load

    generator = load(run_dir, device="cpu")
    return [prompt + generator.generate(prompt, max_new_tokens=SAMPLE_TOKENS, temperature=0.8,
                                        top_k=50, seed=seed) for seed in range(n)]


def _samples_section(run_dir: Path, config: dict, n: int) -> Section:
    if n <= 0:
        return Section("Samples", ["Samples left out (--samples 0)."])
    logged = logged_samples(run_dir)[-n:]
    if logged:
        blocks = ["The last samples the run logged (TensorBoard, `tb/`):"]
        for step, text in logged:
            blocks += [f"Step {step:,}:", Code(text)]
        return Section("Samples", blocks)
    if latest_checkpoint(run_dir) is None:
        return Section("Samples", ["The run stored no samples and has no checkpoint to "
                                   "generate from."])
    prompt = references.setting(config, "train.sample_prompt") or "\n"
    texts = generated_samples(run_dir, prompt, n)
    blocks = [f"The run stored no samples; generated from the latest checkpoint with "
              f"`gptforge.load(run).generate(prompt, max_new_tokens={SAMPLE_TOKENS}, "
              f"temperature=0.8, top_k=50, seed=i)`, prompt {json.dumps(prompt)}:"]
    for i, text in enumerate(texts):
        blocks += [f"Sample {i + 1} (seed {i}):", Code(text)]
    return Section("Samples", blocks)


def cpu_name() -> str:
    """The CPU's model name as lscpu shows it (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine_section(config: dict) -> Section:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    rows = [["CPU", f"{cpu_name()}, {os.cpu_count()} logical cores"],
            ["GPU", ", ".join(gpus) or "none"],
            ["system", f"{platform.system()} {platform.release()}, Python "
             f"{platform.python_version()}"],
            ["torch", torch.__version__], ["gptforge", __version__]]
    device = references.setting(config, "runtime.device")
    return Section("Machine", [f"The machine this report was made on (the run may have "
                               f"trained elsewhere; its runtime.device was {_cell(device)}).",
                               Table(["", "value"], rows)])


# --- rendering -------------------------------------------------------------------------------

def render_markdown(report: Report) -> str:
    lines = [f"# {report.title}", "", report.lead, ""]
    for section in report.sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            lines += [*_markdown_block(block), ""]
    return "\n".join(lines).rstrip() + "\n"


def _markdown_block(block) -> list[str]:
    if isinstance(block, str):
        return [block]
    if isinstance(block, Code):
        fence = "````" if "```" in block.text else "```"
        return [fence, block.text, fence]
    if isinstance(block, Image):
        return [f"![{block.alt}]({block.file})"]

    def row(cells):
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return [row(block.header), row(["---"] * len(block.header)), *map(row, block.rows)]


STYLE = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;"
         "color:#222}table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;"
         "padding:.25rem .6rem;text-align:left;vertical-align:top}pre{background:#f5f5f5;"
         "padding:.6rem;overflow-x:auto;white-space:pre-wrap}img{max-width:100%}"
         "code{background:#f5f5f5}")


def render_html(report: Report) -> str:
    """One HTML page with everything inline (style, images as base64): no external asset."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(report.title)}</title><style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(report.title)}</h1>", f"<p>{_html_text(report.lead)}</p>"]
    for section in report.sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts += [_html_block(block) for block in section.blocks]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _html_text(text: str) -> str:
    """Escaped text with Markdown's `code` spans as <code>."""
    pieces = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(pieces))


def _html_block(block) -> str:
    if isinstance(block, str):
        return f"<p>{_html_text(block)}</p>"
    if isinstance(block, Code):
        pre = f"<pre>{html.escape(block.text)}</pre>"
        if block.summary:
            return f"<details><summary>{html.escape(block.summary)}</summary>{pre}</details>"
        return pre
    if isinstance(block, Image):
        data = base64.b64encode(block.png).decode("ascii")
        return f'<img alt="{html.escape(block.alt)}" src="data:image/png;base64,{data}">'
    head = "".join(f"<th>{html.escape(c)}</th>" for c in block.header)
    body = "".join("<tr>" + "".join(f"<td>{_html_text(c)}</td>" for c in row) + "</tr>"
                   for row in block.rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(report: Report, out_dir: Path) -> tuple[Path, Path]:
    """``report.md`` (with its images beside it) and ``report.html`` in ``out_dir``."""
    out_dir = Path(out_dir)
    try:
        for section in report.sections:
            for block in section.blocks:
                if isinstance(block, Image):
                    atomic.write_bytes(out_dir / block.file, block.png)
        atomic.write_text(out_dir / "report.md", render_markdown(report))
        atomic.write_text(out_dir / "report.html", render_html(report))
    except OSError as err:
        raise GptforgeError(f"--out {out_dir}: cannot write ({err.strerror or err})") from None
    return out_dir / "report.md", out_dir / "report.html"
