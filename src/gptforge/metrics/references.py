"""Reference curves: how a preset's validation loss falls when it trains as intended.

"Is my loss normal?" has an answer only against a run known to be normal. For each preset that
runs on a CPU, the package stores the curve of one real run of it (``references/NAME.json``:
the metrics lines, the resolved config, and how, when and where it was produced). A run is
compared with the reference whose identifying settings (corpus, tokenizer, model shape) it
shares; ``gptforge plot --reference`` overlays the curve and ``gptforge report`` says whether the
run is on track. Presets too large for a CPU (``gpt2_124m`` ...) have none stored.

The comparison is on validation loss at the same optimizer step (interpolated linearly between
the reference's evaluations), as a relative gap: within :data:`TOLERANCE` is on track. Seeds,
bf16 rounding and thread counts move a same-config run by a percent or two, not five.
"""

from __future__ import annotations

import bisect
import json
import math
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from gptforge.errors import GptforgeError
from gptforge.metrics import curves
from gptforge.metrics.curves import Run

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REFERENCE_DIR = "metrics/references"
TOLERANCE = 0.05
"""Relative val-loss gap still counted as on track."""
# Settings that change the shape of a val-loss curve, compared to explain a gap. The model,
# optimizer and schedule sections count whole; of train and data only these keys.
CURVE_SECTIONS = ("model", "optim", "schedule")
CURVE_KEYS = {"train": ("batch_size", "grad_accum", "global_batch_tokens", "max_steps", "seed"),
              "data": ("corpus", "tokenizer", "vocab_size")}
GAP_CAUSES = (
    "different data or tokenizer (a loss is only comparable on the same text and vocabulary)",
    "a lower learning rate, or a longer warmup, early in training",
    "a smaller batch (fewer tokens per step), or fewer steps so the schedule cools down earlier",
    "more dropout or weight decay (regularisation raises the loss before it pays off)",
    "a different model size or context length",
    "a resumed run whose schedule or data order changed, or skipped and rolled-back steps",
)


@dataclass(frozen=True)
class Reference:
    """A stored reference run: its curve (as a :class:`Run`), config and provenance."""

    name: str
    run: Run
    match: dict
    """``section.key -> value`` a run must share for this curve to apply to it."""
    config: dict
    provenance: dict


@dataclass(frozen=True)
class Verdict:
    """How a run's validation loss compares with the reference's at the same step."""

    status: str  # "on track", "behind", "ahead" or "no overlap"
    step: int | None = None
    run_val: float | None = None
    reference_val: float | None = None

    @property
    def gap(self) -> float | None:
        """Relative gap (run - reference) / reference; positive means a higher (worse) loss."""
        if self.run_val is None or self.reference_val is None:
            return None
        return (self.run_val - self.reference_val) / self.reference_val

    def sentence(self, name: str) -> str:
        if self.status == "no overlap":
            return (f"no evaluation of this run falls within the steps of the {name} reference, "
                    "so no verdict")
        return (f"{self.status}: val loss {self.run_val:.4f} at step {self.step:,} against the "
                f"{name} reference's {self.reference_val:.4f} ({self.gap:+.1%}; within "
                f"±{TOLERANCE:.0%} counts as on track)")


def _reference_files() -> list:
    folder = resources.files("gptforge").joinpath(REFERENCE_DIR)
    return sorted((f for f in folder.iterdir() if f.name.endswith(".json")),
                  key=lambda f: f.name)


def reference_names() -> list[str]:
    return [f.name[:-len(".json")] for f in _reference_files()]


def load_reference(name: str) -> Reference:
    """The stored reference called ``name`` (a preset name)."""
    if name not in reference_names():
        raise GptforgeError(f"no stored reference curve named {name!r}; stored: "
                            f"{', '.join(reference_names())}")
    file = resources.files("gptforge").joinpath(REFERENCE_DIR, f"{name}.json")
    data = json.loads(file.read_text(encoding="utf-8"))
    path = Path(str(file))
    run = Run(name=f"reference: {name}", path=path)
    for record in curves.parse_lines("\n".join(json.dumps(r) for r in data["records"]), path):
        (run.evals if "val_loss" in record else run.train).append(record)
    return Reference(name=name, run=run, match=data["match"], config=data["config"],
                     provenance=data["provenance"])


def setting(config: dict, dotted: str):
    """``config["section"]["key"]`` for ``"section.key"``; None where the run has no such key."""
    section, key = dotted.split(".", 1)
    return config.get(section, {}).get(key)


def find_reference(config: dict) -> Reference | None:
    """The stored reference whose identifying settings this run config shares, if any."""
    for name in reference_names():
        reference = load_reference(name)
        if all(setting(config, k) == v for k, v in reference.match.items()):
            return reference
    return None


def config_differences(config: dict, reference: Reference) -> list[tuple[str, object, object]]:
    """``(section.key, run value, reference value)`` for the curve-shaping settings that differ."""
    keys = [f"{s}.{k}" for s in CURVE_SECTIONS for k in reference.config.get(s, {})]
    keys += [f"{s}.{k}" for s, names in CURVE_KEYS.items() for k in names]
    return [(k, setting(config, k), setting(reference.config, k)) for k in keys
            if setting(config, k) != setting(reference.config, k)]


def val_points(run: Run) -> list[tuple[int, float]]:
    """``(step, val_loss)`` of a run's evaluations, finite values only, by step."""
    points = {r["step"]: float(r["val_loss"]) for r in run.evals
              if isinstance(r.get("val_loss"), (int, float)) and math.isfinite(r["val_loss"])}
    return sorted(points.items())


def interpolate(points: list[tuple[int, float]], step: int) -> float:
    """The value at ``step`` on the broken line through ``points`` (step within their range)."""
    steps = [s for s, _ in points]
    i = bisect.bisect_left(steps, step)
    if steps[i] == step:
        return points[i][1]
    (s0, v0), (s1, v1) = points[i - 1], points[i]
    return v0 + (v1 - v0) * (step - s0) / (s1 - s0)


def compare(run: Run, reference: Run, tolerance: float = TOLERANCE) -> Verdict:
    """Compare at the run's last evaluation within the reference's steps (its first, step 0,
    is only the initial loss and says nothing about training, so it is not used alone)."""
    ref = val_points(reference)
    if not ref:
        return Verdict("no overlap")
    own = [(s, v) for s, v in val_points(run) if ref[0][0] <= s <= ref[-1][0] and s > 0]
    if not own:
        return Verdict("no overlap")
    step, value = own[-1]
    expected = interpolate(ref, step)
    gap = (value - expected) / expected
    status = "on track" if abs(gap) <= tolerance else ("behind" if gap > 0 else "ahead")
    return Verdict(status, step, value, expected)


def run_config(run_dir: Path) -> dict:
    """The resolved config a run saved (``RUN_DIR/config.toml``), as a dict of sections."""
    path = Path(run_dir) / "config.toml"
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GptforgeError(f"{path} not found: is {run_dir} a gptforge training run "
                            "directory?") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise GptforgeError(f"{path}: unreadable config ({err})") from None


# The settings a run must share with a reference for its curve to apply.
MATCH_KEYS = ("data.corpus", "data.tokenizer", "model.n_layer", "model.n_head", "model.n_embd",
              "model.block_size")
KEPT_FIELDS = ("step", "loss", "lr", "tokens", "elapsed_sec", "val_loss")


def reference_from_run(run_dir: Path, provenance: dict) -> dict:
    """The JSON of a reference made from a finished run (how the stored ones were made)."""
    config = run_config(run_dir)
    run = curves.read_run(run_dir)
    records = [{k: r[k] for k in KEPT_FIELDS if k in r}
               for r in sorted(run.train + run.evals, key=lambda r: r["step"])]
    return {"match": {k: setting(config, k) for k in MATCH_KEYS}, "provenance": provenance,
            "config": config, "records": records}
