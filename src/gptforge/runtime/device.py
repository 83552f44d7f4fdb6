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
    """Make attention run in float32 under bf16 autocast on CPUs without AMX; True if it did.

    There the bf16 flash-attention backward is 2-3x slower than float32's: a 4-layer 128-wide
    GPT trains 1.35x faster end to end with float32 attention (docs/benchmarks.md). With AMX,
    and on GPUs, bf16 attention is left alone.
    """
    if not (precision.device.type == "cpu" and precision.dtype == torch.bfloat16
            and "amx_bf16" not in _cpu_flags()):
        return False
    from gptforge.model.attention import CausalSelfAttention

    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            module.float32_sdpa = True
    return True


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
    return Precision(device, DTYPES[name])


def seed_everything(seed: int) -> None:
    """Seed PyTorch's generators (CPU and all GPUs); numpy is never used for randomness here."""
    torch.manual_seed(seed)


# Dense 16-bit (bf16, or fp16 where a GPU has no bf16) peak FLOP/s from vendor datasheets, for MFU.
GPU_PEAK_16BIT = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12,
                 "L40S": 362e12, "L4": 121e12, "4090": 165e12, "3090": 71e12, "V100": 125e12}


def peak_flops(precision: Precision) -> float:
    """Peak matmul FLOP/s to divide by for MFU: a datasheet figure on GPUs, measured on CPU."""
    if precision.device.type == "cuda":
        gpu = torch.cuda.get_device_name(precision.device)
        for key, flops in GPU_PEAK_16BIT.items():
            if key in gpu:  # float32 matmuls run as TF32 (enabled by the trainer) at half rate
                return flops if precision.dtype != torch.float32 else flops / 2
    return measure_matmul_flops(precision)


def measure_matmul_flops(precision: Precision, n: int = 1024, seconds: float = 0.3) -> float:
    """Best observed FLOP/s of an n×n×n matmul in the compute dtype (CPU peak varies by machine)."""
    dtype = precision.dtype if precision.dtype != torch.float16 else torch.float32
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
    """Let float32 matmuls use TF32 tensor cores on Ampere+ GPUs (10-bit mantissa, ~8x faster)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
