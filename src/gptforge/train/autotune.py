"""Choosing the compute precision, the attention precision and compilation by timing them.

Which of these is fastest depends on the processor, the model's shape and the batch, not on CPU
flags alone: on a 2-core Xeon with AMX, bf16 autocast trains a 6-layer 384-wide GPT 2x faster than
float32 but a 4-layer 128-wide one 1.5x slower (docs/benchmarks.md). So ``runtime.dtype=auto`` (and
``runtime.compile=auto``) time a few training steps of each candidate at start-up: forward,
backward and the optimizer on a random batch of the run's real shape, on a copy of the model, one
warm-up step then the median of a few timed ones, within a budget of seconds. CPU flags only order
the candidates (the likely winner is timed first, so it is kept if the budget runs out).

The answer is cached per device, model shape, batch shape, thread count and torch version in
``$XDG_CACHE_HOME/gptforge/autotune.json`` (``~/.cache/gptforge``), so later runs start at once.
Tiny models (under 200k parameters, such as the test presets) are not timed: differences
there are noise, and they take the flag-based default. A candidate that fails (a compile error,
say) is skipped with a log line; if all fail, the flag-based default is used. Under torchrun rank
0 decides and the others take its choice.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptforge import atomic
from gptforge.config.schema import Config
from gptforge.runtime import distributed
from gptforge.runtime.device import (
    DTYPES,
    Precision,
    cpu_has_native_bf16,
    cpu_model_name,
    flag_float32_attention,
    resolve_precision,
    set_float32_attention,
    synchronize,
)
from gptforge.train.objectives import LanguageModeling
from gptforge.train.optim import build_optimizer

log = logging.getLogger(__name__)

MIN_PARAMS = 200_000
"""Models smaller than this are not timed: they take the flag-based default."""
BUDGET_SECONDS = 8.0
"""Time for all candidates' timed steps together (compilation is not counted)."""
TIMED_STEPS = 3
CACHE_VERSION = 1


@dataclass(frozen=True)
class Candidate:
    """One way to run the training step."""

    dtype: str  # a key of DTYPES
    float32_attention: bool = False
    compile: bool = False

    @property
    def label(self) -> str:
        parts = [self.dtype + (" autocast" if self.dtype != "float32" else "")]
        if self.float32_attention:
            parts.append("float32 attention")
        if self.compile:
            parts.append("compiled")
        return ", ".join(parts)


@dataclass
class Choice:
    """What was chosen, how (``measured``, ``cached`` or ``default``) and why."""

    candidate: Candidate
    source: str
    reason: str
    seconds_per_step: dict[str, float] = field(default_factory=dict)  # label -> median seconds

    def describe(self) -> str:
        timings = ", ".join(f"{label} {s * 1e3:.1f} ms" for label, s in
                            sorted(self.seconds_per_step.items(), key=lambda kv: kv[1]))
        text = f"{self.candidate.label} ({self.source}: {self.reason})"
        return f"{text}; per step: {timings}" if timings else text

    def to_dict(self) -> dict:
        return {"candidate": dataclasses.asdict(self.candidate), "source": self.source,
                "reason": self.reason, "seconds_per_step": self.seconds_per_step}

    @classmethod
    def from_dict(cls, data: dict) -> Choice:
        return cls(Candidate(**data["candidate"]), data["source"], data["reason"],
                   {k: float(v) for k, v in data["seconds_per_step"].items()})


# ---- candidates ------------------------------------------------------------------------------
def default_candidate(cfg: Config, device: torch.device) -> Candidate:
    """The choice CPU/GPU flags alone make (the behaviour before measuring)."""
    precision = resolve_precision(device, cfg.runtime.dtype)
    compile_ = cfg.runtime.compile if isinstance(cfg.runtime.compile, bool) \
        else device.type == "cuda"
    return Candidate(precision.name, flag_float32_attention(precision), compile_)


def candidates(cfg: Config, device: torch.device) -> list[Candidate]:
    """Everything worth timing for this config on this device, the flag-based default first."""
    dtype_setting, compile_setting = cfg.runtime.dtype, cfg.runtime.compile
    if dtype_setting != "auto":
        dtypes = [dtype_setting]
    elif device.type == "cpu":  # flags order, never decide: both are timed
        dtypes = ["bfloat16", "float32"] if cpu_has_native_bf16() else ["float32", "bfloat16"]
    else:  # GPUs: 16-bit tensor cores always win over float32; MPS: as the flags say
        dtypes = [resolve_precision(device, "auto").name]
    compiles = [compile_setting] if isinstance(compile_setting, bool) else [False, True]
    out = []
    for dtype in dtypes:
        attention = [False, True] if device.type == "cpu" and dtype == "bfloat16" else [False]
        out += [Candidate(dtype, a, c) for a in attention for c in compiles]
    first = default_candidate(cfg, device)
    return sorted(out, key=lambda c: c != first)  # stable: keeps the flag order otherwise


# ---- timing ----------------------------------------------------------------------------------
def time_training_step(cfg: Config, model: torch.nn.Module, device: torch.device,
                       candidate: Candidate, seconds_left: float) -> float:
    """Median seconds of a training step (forward, backward, clipping, AdamW) of a copy of
    ``model`` run as ``candidate`` on a random batch of the run's shape (1 warm-up step first)."""
    trial = copy.deepcopy(model)
    set_float32_attention(trial, candidate.float32_attention)
    runner = torch.compile(trial) if candidate.compile else trial
    precision = Precision(device, DTYPES[candidate.dtype])
    optimizer = build_optimizer(trial, cfg.optim, device)
    B, T = int(cfg.train.batch_size), cfg.model.block_size
    batch = (torch.randint(0, cfg.model.vocab_size, (B, T), device=device),
             torch.randint(0, cfg.model.vocab_size, (B, T), device=device))
    objective = LanguageModeling()

    def step() -> float:
        t0 = time.perf_counter()
        with precision.autocast():
            loss, _ = objective(runner, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trial.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - t0

    warm = step()  # optimizer state, kernel choice, compilation
    if candidate.compile:
        warm = step()  # the first step after compiling still settles
    steps = max(1, min(TIMED_STEPS, int(seconds_left / max(warm, 1e-9))))
    return statistics.median(step() for _ in range(steps))


Timer = Callable[[Candidate, float], float]
"""(candidate, seconds of budget left) -> seconds per step; raises if the candidate cannot run."""


def measure(options: list[Candidate], timer: Timer, budget: float = BUDGET_SECONDS,
            clock: Callable[[], float] = time.perf_counter) -> tuple[dict[Candidate, float], bool]:
    """Seconds per step of each candidate that runs, in order, until the budget is spent;
    and whether every candidate got its turn (False if the budget ran out first)."""
    results: dict[Candidate, float] = {}
    start = clock()
    for i, candidate in enumerate(options):
        left = budget - (clock() - start)
        if left <= 0 and results:
            log.info("autotune: time budget of %.0f s spent; %s not timed", budget,
                     ", ".join(c.label for c in options[i:]))
            return results, False
        try:  # an equal share of what is left for each candidate still to come
            results[candidate] = timer(candidate, max(left, 0.0) / (len(options) - i))
        except Exception as err:  # noqa: BLE001 - any failure just rules the candidate out
            first_line = str(err).splitlines()[0][:200] if str(err) else ""
            log.info("autotune: %s skipped (%s: %s)", candidate.label, type(err).__name__,
                     first_line)
    return results, True


# ---- cache -----------------------------------------------------------------------------------
def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gptforge" / "autotune.json"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}: {cpu_model_name()}"


def cache_key(cfg: Config, device: torch.device, options: list[Candidate]) -> str:
    """What a timing depends on, hashed: device, threads, model shape, batch shape, torch,
    what was allowed to vary and the runtime switches that change the step."""
    what = {"version": CACHE_VERSION, "device": device_name(device),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "model": dataclasses.asdict(cfg.model),
            "batch": [cfg.train.batch_size, cfg.model.block_size],
            "optimizer": [cfg.optim.name, cfg.optim.fused],
            "activation_checkpointing": cfg.runtime.activation_checkpointing,
            "candidates": [dataclasses.asdict(c) for c in options]}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def read_cache(path: Path) -> dict:
    """The cache's entries; an unreadable or corrupt file counts as empty (with a warning)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
            raise ValueError("not an autotune cache")
        return data["entries"]
    except (OSError, ValueError, UnicodeDecodeError) as err:
        log.warning("ignoring the autotune cache %s (%s); it will be rewritten", path, err)
        return {}


def write_cache(path: Path, key: str, choice: Choice) -> None:
    entries = read_cache(path)
    entries[key] = {**choice.to_dict(), "saved": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        atomic.write_text(path, json.dumps({"entries": entries}, indent=1) + "\n")
    except OSError as err:  # a read-only home must not stop training
        log.warning("cannot write the autotune cache %s (%s)", path, err)


def cached_choice(path: Path, key: str) -> Choice | None:
    entry = read_cache(path).get(key)
    if entry is None:
        return None
    try:
        choice = Choice.from_dict(entry)
    except (KeyError, TypeError, ValueError):
        log.warning("ignoring a damaged entry of the autotune cache %s", path)
        return None
    return dataclasses.replace(choice, source="cached",
                               reason=f"{choice.reason}, timed {entry.get('saved', 'earlier')}")


# ---- the decision ----------------------------------------------------------------------------
def decide(cfg: Config, model: torch.nn.Module, device: torch.device, *,
           timer: Timer | None = None, path: Path | None = None) -> Choice:
    """The candidate to run with: from the cache, by timing, or the flag-based default."""
    options, fallback = candidates(cfg, device), default_candidate(cfg, device)
    n_params = sum(p.numel() for p in model.parameters())
    if len(options) == 1:
        return Choice(options[0], "default", "nothing to choose")
    if n_params < MIN_PARAMS:
        return Choice(fallback, "default", f"{n_params / 1e6:.2f}M parameters: too small to time")
    path = path or cache_path()
    key = cache_key(cfg, device, options)
    cached = cached_choice(path, key)
    if cached is not None:
        return cached
    if timer is None:
        def timer(candidate: Candidate, left: float) -> float:
            return time_training_step(cfg, model, device, candidate, left)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        results, complete = measure(options, timer)  # the run's random streams are kept
    if not results:
        return Choice(fallback, "default", "every candidate failed to run")
    best = min(results, key=results.get)
    timings = {c.label: round(s, 6) for c, s in results.items()}
    if not complete:  # not cached: a later, less busy start times them all
        return Choice(best, "measured", f"fastest of the {len(results)} of {len(options)} "
                      "timed within the budget", timings)
    choice = Choice(best, "measured", f"fastest of {len(results)} timed", timings)
    write_cache(path, key, choice)
    return choice


def choose(cfg: Config, model: torch.nn.Module, device: torch.device,
           dist_info: distributed.DistInfo, *, timer: Timer | None = None) -> Choice:
    """``decide`` on rank 0; every rank returns rank 0's choice (a collective under torchrun)."""
    choice = decide(cfg, model, device, timer=timer) if dist_info.is_main else None
    if dist_info.enabled:
        choice = distributed.gather_objects(choice, dist_info)[0]
    return choice


def apply(choice: Choice, model: torch.nn.Module, device: torch.device) -> Precision:
    """Set the attention precision on ``model``; return the precision to train in."""
    set_float32_attention(model, choice.candidate.float32_attention)
    return Precision(device, DTYPES[choice.candidate.dtype])


def config_comment(choice: Choice) -> str:
    """Lines for the end of RUN_DIR/config.toml: what ``auto`` chose and why (TOML comments)."""
    lines = ["", "# Chosen at start-up for runtime.dtype / runtime.compile (train/autotune.py):",
             f"#   {choice.candidate.label}",
             f"#   {choice.source}: {choice.reason}"]
    lines += [f"#   {label}: {s * 1e3:.1f} ms/step" for label, s in
              sorted(choice.seconds_per_step.items(), key=lambda kv: kv[1])]
    return "\n".join(lines) + "\n"
