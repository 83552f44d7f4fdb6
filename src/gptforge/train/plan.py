"""Planning a run before starting it: will it fit, how fast is it, how long will it take.

The counts come from the model built on the meta device (no memory used, so any size can be
planned): parameters, training FLOPs per token, and the memory estimate of
:mod:`gptforge.runtime.memory`. The speed is measured: a few real training steps (the model, the
optimizer, the objective, a random batch) on this device give tokens/s and MFU, and the peak
memory those steps used, shown beside the estimate. Common GPUs are estimated from their datasheet
peak FLOP/s (the table in :mod:`gptforge.runtime.device`) at an assumed MFU, stated in the output.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptforge.config.schema import Config
from gptforge.errors import GptforgeError
from gptforge.model.gpt import GPT
from gptforge.runtime import memory
from gptforge.runtime.activation_checkpointing import apply_activation_checkpointing
from gptforge.runtime.batch_size import largest_divisor_at_most
from gptforge.runtime.device import (
    Precision,
    gpu_peak_flops,
    peak_flops,
    resolve_device,
    resolve_precision,
    seed_everything,
    synchronize,
    use_float32_attention,
)
from gptforge.train.objectives import LanguageModeling
from gptforge.train.optim import build_optimizer

log = logging.getLogger(__name__)

# (label, the name torch.cuda.get_device_name reports, memory in GB) of GPUs people plan for.
GPUS = (("A100 80GB", "NVIDIA A100-SXM4-80GB", 80), ("H100 80GB", "NVIDIA H100 80GB HBM3", 80),
        ("H200", "NVIDIA H200", 141), ("RTX 4090", "NVIDIA GeForce RTX 4090", 24),
        ("L4", "NVIDIA L4", 24))
DEFAULT_MFU = 0.4  # a well-tuned bf16 GPT run reaches 40-50% on these GPUs
HEADROOM = 0.9  # share of memory a plan may fill: the rest is for the allocator's fragmentation,
#                 the CUDA context and kernels' scratch space
MAX_MEASURE_SECONDS = 60.0  # measuring skipped when the steps would take longer (predicted)


@dataclass
class Measurement:
    """A few real training steps on this device."""

    device: str
    dtype: str
    steps: int
    tokens_per_sec: float
    mfu: float
    peak_flops: float
    peak_bytes: int  # measured peak of tensor memory during one step


@dataclass
class Plan:
    label: str
    params: int
    active_params: int
    flops_per_token: int
    batch_size: int
    block_size: int
    grad_accum: int
    max_steps: int
    compute_dtype: str
    checkpointing: bool
    optimizer: str
    memory: memory.MemoryEstimate
    measurement: Measurement | None = None
    skipped: str | None = None  # why nothing was measured
    gpus: list[dict] = field(default_factory=list)
    suggestion: dict = field(default_factory=dict)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size * self.grad_accum


def with_vocab_size(cfg: Config) -> Config:
    """The config with ``model.vocab_size`` known: set, or read from the prepared data."""
    from gptforge.data.manifest import Manifest
    from gptforge.train.pretraining import with_vocab

    if cfg.model.vocab_size > 0:
        return cfg
    if not (Path(cfg.data.dir) / "manifest.json").is_file():
        raise GptforgeError(f"model.vocab_size is 0 (taken from the data) and {cfg.data.dir} is "
                            "not prepared yet; prepare it or set model.vocab_size=N")
    return with_vocab(cfg, Manifest.read(cfg.data.dir))


def make_plan(cfg: Config, label: str, *, steps: int = 3, memory_gb: float | None = None,
              mfu: float = DEFAULT_MFU) -> Plan:
    """Count, estimate and (unless ``steps`` is 0) measure a run of ``cfg``."""
    cfg = with_vocab_size(cfg)
    if cfg.runtime.threads > 0:  # measured as the run would train
        torch.set_num_threads(cfg.runtime.threads)
    if cfg.train.batch_size == "auto":
        raise GptforgeError("train.batch_size=auto: give a number to plan for; the plan "
                            "suggests the largest that fits (--memory-gb)")
    precision = resolve_precision(resolve_device(cfg.runtime.device), cfg.runtime.dtype)
    plan = _counted(cfg, label, precision)
    budget = memory_gb * 1e9 if memory_gb else device_memory_bytes(precision.device)
    plan.suggestion = suggest(cfg, budget, plan.checkpointing, _bytes(precision.dtype))
    plan.gpus = gpu_estimates(cfg, plan, mfu)
    if steps <= 0:
        plan.skipped = "--steps 0"
        return plan
    peak = peak_flops(precision)
    plan.skipped = _why_not_measure(plan, precision, steps, peak)
    if plan.skipped is None:
        plan.measurement = measure(cfg, precision, steps, peak)
    return plan


def _counted(cfg: Config, label: str, precision: Precision) -> Plan:
    model, optimizer = _meta_model(cfg)
    tc = cfg.train
    grad_accum = tc.grad_accum
    if tc.global_batch_tokens > 0:
        grad_accum = _accum_for(tc.global_batch_tokens, tc.batch_size, cfg.model.block_size)
    return Plan(
        label=label, params=model.num_params(), active_params=model.num_active_params(),
        flops_per_token=model.flops_per_token(), batch_size=tc.batch_size,
        block_size=cfg.model.block_size, grad_accum=grad_accum, max_steps=tc.max_steps,
        compute_dtype=precision.name, checkpointing=cfg.runtime.activation_checkpointing,
        optimizer=cfg.optim.name,
        memory=memory.estimate(model, optimizer, cfg.model, tc.batch_size, cfg.model.block_size,
                               _bytes(precision.dtype)))


def _meta_model(cfg: Config):
    """The model and its optimizer with parameters on the meta device: shapes, no memory."""
    with torch.device("meta"):
        model = GPT(cfg.model)
    optim_cfg = dataclasses.replace(cfg.optim, fused="false")  # no fused kernel for meta
    return model, build_optimizer(model, optim_cfg, torch.device("meta"))


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _accum_for(global_batch_tokens: int, batch_size: int, block_size: int) -> int:
    per_micro = batch_size * block_size
    if global_batch_tokens % per_micro:
        raise GptforgeError(f"train.global_batch_tokens={global_batch_tokens} is not a multiple "
                            f"of batch_size x block_size = {batch_size} x {block_size}")
    return global_batch_tokens // per_micro


def device_memory_bytes(device: torch.device) -> float:
    """Memory a run on ``device`` can use: the GPU's, or the machine's RAM for a CPU."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX: no RAM figure
        return math.inf


def largest_batch(cfg: Config, budget_bytes: float, checkpointing: bool,
                  compute_bytes: int) -> int:
    """The largest micro-batch whose estimated step fills at most HEADROOM of the budget."""
    model, optimizer = _meta_model(cfg)
    T = cfg.model.block_size
    fixed = memory.estimate(model, optimizer, cfg.model, 0, T, compute_bytes).total(checkpointing)
    per_sequence = memory.activation_bytes(cfg.model, 1, T, compute_bytes, checkpointing)
    if math.isinf(budget_bytes):
        return 1 << 16
    return max(0, int((budget_bytes * HEADROOM - fixed) // per_sequence))


def suggest(cfg: Config, budget_bytes: float, checkpointing: bool, compute_bytes: int) -> dict:
    """The micro-batch and accumulation for this memory that keep the tokens per optimizer step
    (``train.global_batch_tokens``, else batch_size x block_size x grad_accum)."""
    fits = largest_batch(cfg, budget_bytes, checkpointing, compute_bytes)
    out = {"memory_bytes": budget_bytes, "largest_batch": fits}
    tc, T = cfg.train, cfg.model.block_size
    tokens = tc.global_batch_tokens or tc.batch_size * T * tc.grad_accum
    if fits == 0:
        return out
    if tokens % T:
        raise GptforgeError(f"train.global_batch_tokens={tokens} must be a multiple of "
                            f"model.block_size={T}")
    batch = largest_divisor_at_most(tokens // T, fits)
    out.update(batch_size=batch, grad_accum=tokens // T // batch, global_batch_tokens=tokens)
    return out


def gpu_estimates(cfg: Config, plan: Plan, mfu: float) -> list[dict]:
    """Tokens/s, time to max_steps and the largest micro-batch on common GPUs, in bf16."""
    rows = []
    for label, name, gb in GPUS:
        peak = gpu_peak_flops(name, torch.bfloat16, (9, 0))
        tokens_per_sec = peak * mfu / plan.flops_per_token
        rows.append({"gpu": label, "memory_gb": gb, "peak_flops": peak,
                     "tokens_per_sec": tokens_per_sec,
                     "seconds": plan.max_steps * plan.tokens_per_step / tokens_per_sec,
                     "largest_batch": largest_batch(cfg, gb * 1e9, plan.checkpointing, 2)})
    return rows


def _why_not_measure(plan: Plan, precision: Precision, steps: int, peak: float) -> str | None:
    available = device_memory_bytes(precision.device)
    needed = plan.memory.total(plan.checkpointing)
    if needed > available * HEADROOM:
        return (f"the estimate ({needed / 1e9:.1f} GB) does not fit this {precision.device.type}'s "
                f"{available / 1e9:.1f} GB")
    flops = plan.flops_per_token * plan.batch_size * plan.block_size * (steps + 1)
    predicted = flops / (peak * 0.3)  # at a modest 30% of the matmul peak
    if predicted > MAX_MEASURE_SECONDS:
        return (f"{steps + 1} steps would take about {predicted:.0f} s here; lower "
                "train.batch_size or --steps to measure")
    return None


def measure(cfg: Config, precision: Precision, steps: int, peak: float) -> Measurement:
    """Time ``steps`` training steps (after one warm-up step) of a real model on a random batch."""
    device = precision.device
    seed_everything(cfg.train.seed)
    model = GPT(cfg.model).to(device)
    if cfg.runtime.activation_checkpointing:
        apply_activation_checkpointing(model)
    use_float32_attention(model, precision)
    train_model = torch.compile(model) if cfg.runtime.compile is True else model
    optimizer = build_optimizer(model, cfg.optim, device)
    B, T = cfg.train.batch_size, cfg.model.block_size
    x = torch.randint(0, cfg.model.vocab_size, (B, T), device=device)
    y = torch.randint(0, cfg.model.vocab_size, (B, T), device=device)
    step = _step_function(train_model, optimizer, precision, (x, y), cfg.optim.grad_clip)
    step()  # warm-up: optimizer state, kernel selection, compilation
    peak_bytes = _measured_peak(step, model, optimizer, device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    tokens_per_sec = steps * B * T / (time.perf_counter() - start)
    return Measurement(device=str(device), dtype=precision.name, steps=steps,
                       tokens_per_sec=tokens_per_sec,
                       mfu=tokens_per_sec * model.flops_per_token() / peak, peak_flops=peak,
                       peak_bytes=peak_bytes)


def _step_function(model, optimizer, precision: Precision, batch, grad_clip: float):
    objective = LanguageModeling()

    def step() -> None:
        with precision.autocast():
            loss, _ = objective(model, batch)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _measured_peak(step, model, optimizer, device: torch.device) -> int:
    """Peak tensor memory of one step: CUDA's allocator statistics, or followed tensor by
    tensor elsewhere (the weights and the optimizer state counted from the start)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return torch.cuda.max_memory_allocated(device)
    state = [t for s in optimizer.state.values() for t in s.values()
             if isinstance(t, torch.Tensor)]
    tracker = memory.AllocationTracker([*model.parameters(), *model.buffers(), *state])
    with tracker:
        step()
    return tracker.peak


def to_dict(plan: Plan) -> dict:
    """The plan as JSON-able data, totals included."""
    data = dataclasses.asdict(plan)
    data["tokens_per_step"] = plan.tokens_per_step
    data["memory"]["total"] = plan.memory.total(False)
    data["memory"]["total_checkpointed"] = plan.memory.total(True)
    return data


def format_plan(plan: Plan, mfu: float) -> str:
    """The plan as the text ``gptforge plan`` prints."""
    return "\n".join([*_format_counts(plan), "", *_format_memory(plan), "",
                      *_format_speed(plan), "", *_format_gpus(plan, mfu), "",
                      *_format_suggestion(plan)]) + "\n"


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    hours, rest = divmod(int(round(seconds)), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _format_counts(plan: Plan) -> list[str]:
    active = f" ({_count(plan.active_params)} active per token)" \
        if plan.active_params != plan.params else ""
    return [f"plan for {plan.label}",
            f"  parameters        {_count(plan.params)}{active}",
            f"  FLOPs per token   {_count(plan.flops_per_token)} (training: forward + backward)",
            f"  batch             {plan.batch_size} x {plan.block_size} tokens x "
            f"{plan.grad_accum} accumulation = {plan.tokens_per_step:,} tokens per step; "
            f"{plan.max_steps:,} steps = {_count(plan.tokens_per_step * plan.max_steps)} tokens"]


OPTIMIZER_STATE = {"adamw": "AdamW: 2 float32 moments", "muon": "Muon momentum + AdamW moments",
                   "adafactor": "Adafactor: factored second moment"}


def _format_memory(plan: Plan) -> list[str]:
    m = plan.memory
    lines = [f"memory per process, micro-batch {plan.batch_size}, {plan.compute_dtype} compute "
             "(estimate)",
             f"  weights (float32)        {_size(m.weights):>10}",
             f"  gradients (float32)      {_size(m.grads):>10}",
             f"  optimizer state          {_size(m.optimizer):>10}   "
             f"({OPTIMIZER_STATE.get(plan.optimizer, plan.optimizer)})"]
    if m.autocast_copies:
        lines.append(f"  autocast weight copies   {_size(m.autocast_copies):>10}")
    lines += [f"  activations              {_size(m.activations):>10}   "
              f"with activation checkpointing: {_size(m.activations_checkpointed)}",
              f"  total                    {_size(m.total(False)):>10}   "
              f"with activation checkpointing: {_size(m.total(True))}"
              + ("   (on in this config)" if plan.checkpointing else "")]
    if plan.measurement is not None:
        lines.append(f"  measured peak            {_size(plan.measurement.peak_bytes):>10}   "
                     f"(one real step on {plan.measurement.device})")
    return lines


def _format_speed(plan: Plan) -> list[str]:
    m = plan.measurement
    if m is None:
        return [f"speed on this device: not measured ({plan.skipped})"]
    seconds = plan.max_steps * plan.tokens_per_step / m.tokens_per_sec
    return [f"speed on {m.device} ({m.dtype}, {m.steps} steps after a warm-up)",
            f"  tokens/s          {m.tokens_per_sec:,.0f}",
            f"  MFU               {m.mfu:.1%} of {m.peak_flops / 1e12:.3g} TFLOP/s",
            f"  time to max_steps {_duration(seconds)} ({plan.max_steps:,} steps)"]


def _format_gpus(plan: Plan, mfu: float) -> list[str]:
    lines = [f"on common GPUs (bf16, assumed MFU {mfu:.0%}; --mfu to change)",
             f"  {'GPU':<10} {'memory':>7} {'peak TFLOP/s':>13} {'tokens/s':>14} "
             f"{'time to max_steps':>18} {'largest micro-batch':>20}"]
    for row in plan.gpus:
        tflops = row["peak_flops"] / 1e12
        lines.append(f"  {row['gpu']:<10} {row['memory_gb']:>5} GB {tflops:>13.0f} "
                     f"{row['tokens_per_sec']:>14,.0f} {_duration(row['seconds']):>18} "
                     f"{row['largest_batch']:>20,}")
    return lines


def _format_suggestion(plan: Plan) -> list[str]:
    s = plan.suggestion
    where = f"{_size(s['memory_bytes'])}" if math.isfinite(s["memory_bytes"]) else "unbounded"
    if s["largest_batch"] == 0:
        return [f"in {where}: not even one sequence fits; enable "
                "runtime.activation_checkpointing, lower model.block_size, or shard the model "
                "(runtime.parallel=fsdp)"]
    line = (f"in {where} ({HEADROOM:.0%} of it used): micro-batches up to "
            f"{s['largest_batch']:,} fit")
    return [line, f"  for {s['global_batch_tokens']:,} tokens per step: "
                  f"train.batch_size={s['batch_size']} train.grad_accum={s['grad_accum']}"]
