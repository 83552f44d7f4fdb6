"""Choosing the device and the numeric precision, and the autocast context for them.

Weights and optimizer state stay in float32; ``bfloat16``/``float16`` mean *autocast*: matmuls run
in low precision while reductions and the master weights keep full precision. bf16 has float32's
range, so it needs no loss scaling; fp16 does (``torch.amp.GradScaler``).

On CPU, bf16 pays only where the processor has native bf16 matrix instructions (Intel AMX or
AVX512-BF16): measured on a 2-core Sapphire Rapids, a 6-layer 384-wide GPT trains 2-2.4x faster
with bf16 autocast than in fp32 (docs/benchmarks.md). Elsewhere it is emulated and slower.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gptforge.errors import GptforgeError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Precision:
    device: torch.device
    dtype: torch.dtype  # compute dtype inside autocast; float32 = no autocast

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @property
    def needs_grad_scaler(self) -> bool:
        return self.dtype == torch.float16


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GptforgeError(f"runtime.device: unknown device '{name}' "
                            "(use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GptforgeError("runtime.device is 'cuda' but PyTorch sees no CUDA GPU; "
                            "use runtime.device=cpu or install a CUDA build of torch")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise GptforgeError("runtime.device is 'mps' but MPS is not available here")
    return device


def cpu_has_native_bf16() -> bool:
    """True if /proc/cpuinfo lists AMX-BF16 or AVX512-BF16 (Linux; False elsewhere)."""
    flags = _cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def use_float32_attention(model: torch.nn.Module, precision: Precision) -> bool:
    """Make attention run in float32 under bf16 autocast where the flags say it is faster; True
    if it did (``train/autotune.py`` times both instead, for ``runtime.dtype=auto``)."""
    on = flag_float32_attention(precision)
    if on:
        set_float32_attention(model, True)
    return on


def flag_float32_attention(precision: Precision) -> bool:
    """The flag-based guess: float32 attention under bf16 autocast on CPUs without AMX.

    There the bf16 flash-attention backward is 2-3x slower than float32's: a 4-layer 128-wide
    GPT trains 1.35x faster end to end with float32 attention (docs/benchmarks.md). With AMX,
    and on GPUs, bf16 attention is left alone.
    """
    return (precision.device.type == "cpu" and precision.dtype == torch.bfloat16
            and "amx_bf16" not in _cpu_flags())


def set_float32_attention(model: torch.nn.Module, on: bool) -> None:
    """Compute every attention product of ``model`` in float32 (``on``) or in the autocast dtype."""
    from gptforge.model.attention import CausalSelfAttention

    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            module.float32_sdpa = on


def cpu_model_name() -> str:
    """The processor's model name from /proc/cpuinfo ("unknown" where there is none)."""
    for line in _cpu_flags().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return "unknown"


@functools.cache
def _cpu_flags() -> str:
    """The text of /proc/cpuinfo, read once ("" where there is none)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def resolve_precision(device: torch.device, name: str) -> Precision:
    if name == "auto":
        if device.type == "cuda":
            native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            dtype = torch.bfloat16 if native_bf16 else torch.float16
        elif device.type == "cpu" and cpu_has_native_bf16():
            dtype = torch.bfloat16
        else:
            dtype = torch.float32
        return Precision(device, dtype)
    if name not in DTYPES:
        raise GptforgeError(f"runtime.dtype: unknown dtype '{name}' "
                            f"(use auto, {', '.join(DTYPES)})")
    if name == "float16" and device.type == "cpu":
        raise GptforgeError("runtime.dtype=float16 is not supported on CPU; "
                            "use bfloat16 or float32")
    if name == "bfloat16" and device.type == "cuda" \
            and not torch.cuda.is_bf16_supported(including_emulation=False):
        log.warning("runtime.dtype=bfloat16: this GPU has no native bf16 (it predates Ampere), "
                    "so it is emulated and slow; runtime.dtype=auto picks float16 here")
    return Precision(device, DTYPES[name])


def seed_everything(seed: int) -> None:
    """Seed PyTorch's generators (CPU and all GPUs); numpy is never used for randomness here."""
    torch.manual_seed(seed)


# Dense (not 2:4-sparse) bf16/fp16 tensor-core peak FLOP/s with float32 accumulation, from the
# vendor datasheets (which quote sparse figures: these are half of them), for MFU. Patterns are
# tried in order against torch.cuda.get_device_name(), so specific variants come first:
# "NVIDIA H100 80GB HBM3" is the SXM part, "NVIDIA H100 PCIe" and "NVIDIA H100 NVL" are not.
GPU_PEAK_16BIT: tuple[tuple[str, float], ...] = (
    (r"\bGB200\b", 2.5e15),
    (r"\bB200\b", 2.25e15),  # HGX B200 (1000 W)
    (r"\bH[12]00\b.*\bNVL\b", 835e12),
    (r"\bH[18]00\b.*\bPCIe\b", 756e12),
    (r"\b(GH200|H200|H100|H800)\b", 989e12),  # SXM: H200 has H100's compute, more memory
    (r"\bH20\b", 148e12),
    (r"\b(A100|A800)\b", 312e12),  # SXM and PCIe alike
    (r"\bA30\b", 165e12),
    (r"\bA40\b", 149.7e12),
    (r"\bA10\b", 125e12),  # not the A10G (AWS), whose tensor rate is lower: measured instead
    (r"\bL40S\b", 362e12),
    (r"\bL40\b", 181e12),
    (r"\bL4\b", 121e12),
    (r"\b4090\b", 165e12),  # GeForce: fp32 accumulation runs at half the fp16-accumulate rate
    (r"\b3090 Ti\b", 80e12),
    (r"\b3090\b", 71e12),
    (r"\bV100S\b", 130e12),  # Volta and Turing: fp16 only (no bf16, no TF32)
    (r"\bV100\b.*\bPCIE\b", 112e12),
    (r"\bV100\b", 125e12),
    (r"\bT4\b", 65e12),
)


def gpu_peak_flops(name: str, dtype: torch.dtype, capability: tuple[int, int]) -> float | None:
    """Datasheet peak FLOP/s of the GPU called ``name`` for ``dtype`` matmuls; None if unknown.

    float32 matmuls run as TF32 (``enable_tf32``), at half the 16-bit rate, on Ampere (compute
    capability 8.0) and later; older GPUs have no TF32 and a MIG slice only part of the GPU, so
    those are measured instead.
    """
    if "MIG" in name or (dtype == torch.float32 and capability < (8, 0)):
        return None
    for pattern, flops in GPU_PEAK_16BIT:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return flops / 2 if dtype == torch.float32 else flops
    return None


def peak_flops(precision: Precision) -> float:
    """Peak matmul FLOP/s to divide by for MFU: a datasheet figure on GPUs, measured on CPU."""
    if precision.device.type == "cuda":
        name = torch.cuda.get_device_name(precision.device)
        capability = torch.cuda.get_device_capability(precision.device)
        flops = gpu_peak_flops(name, precision.dtype, capability)
        if flops is not None:
            log.debug("peak %.0f TFLOP/s (%s, %s datasheet)", flops / 1e12, precision.name, name)
            return flops
        log.info("%s is not in the peak-FLOP/s table: MFU is relative to a measured matmul", name)
    return measure_matmul_flops(precision)


def measure_matmul_flops(precision: Precision, n: int | None = None,
                         seconds: float = 0.3) -> float:
    """Best observed FLOP/s of an n×n×n matmul in the compute dtype (CPU peak varies by machine).

    On a GPU the matrices are 4096 wide: at 1024 an H100 spends more time launching than computing.
    """
    n = n or (4096 if precision.device.type == "cuda" else 1024)
    dtype = precision.dtype
    if dtype == torch.float16 and precision.device.type == "cpu":
        dtype = torch.float32
    a = torch.randn(n, n, device=precision.device, dtype=dtype)
    b = torch.randn(n, n, device=precision.device, dtype=dtype)
    best, deadline = 0.0, time.perf_counter() + seconds
    a @ b  # warm-up
    synchronize(precision.device)
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        a @ b
        synchronize(precision.device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that timings measure the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def enable_tf32(device: torch.device) -> None:
    """Let float32 matmuls use TF32 tensor cores on Ampere+ GPUs (10-bit mantissa, ~8x faster).

    The ``allow_tf32`` flags, not the per-backend ``fp32_precision = "tf32"`` settings of torch
    2.9+: once those are written, the legacy getters raise, and Inductor (torch.compile) still
    reads ``torch.get_float32_matmul_precision()`` for its cache keys (pytorch/pytorch#189955).
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
