"""The CUDA-side choices of runtime/device.py, checked without a GPU (names and flags faked)."""

import pytest
import torch

from gptforge.runtime import device as device_mod
from gptforge.runtime.device import enable_tf32, gpu_peak_flops, peak_flops, resolve_precision

AMPERE, HOPPER, VOLTA = (8, 0), (9, 0), (7, 0)


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989),  # SXM
    ("NVIDIA H100 PCIe", 756),
    ("NVIDIA H100 NVL", 835),
    ("NVIDIA H200", 989),
    ("NVIDIA H200 NVL", 835),
    ("NVIDIA GH200 480GB", 989),
    ("NVIDIA H800", 989),
    ("NVIDIA H20", 148),
    ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA A100-PCIE-40GB", 312),
    ("NVIDIA A100 80GB PCIe", 312),
    ("NVIDIA A10", 125),
    ("NVIDIA L4", 121),
    ("NVIDIA L40", 181),
    ("NVIDIA L40S", 362),
    ("NVIDIA GeForce RTX 4090", 165),
    ("NVIDIA GeForce RTX 3090", 71),
    ("NVIDIA GeForce RTX 3090 Ti", 80),
    ("NVIDIA B200", 2250),
    ("NVIDIA GB200", 2500),
])
def test_dense_bf16_peak_by_gpu_name(name, tflops):
    assert gpu_peak_flops(name, torch.bfloat16, HOPPER) == pytest.approx(tflops * 1e12, rel=1e-3)
    assert gpu_peak_flops(name, torch.float16, HOPPER) == gpu_peak_flops(name, torch.bfloat16,
                                                                         HOPPER)


def test_tf32_peak_is_half_on_ampere_and_measured_before():
    assert gpu_peak_flops("NVIDIA A100-SXM4-40GB", torch.float32, AMPERE) == 156e12
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", torch.float32, HOPPER) == 494.5e12
    assert gpu_peak_flops("Tesla V100-SXM2-16GB", torch.float16, VOLTA) == 125e12
    assert gpu_peak_flops("Tesla V100-PCIE-16GB", torch.float16, VOLTA) == 112e12
    assert gpu_peak_flops("Tesla V100-SXM2-16GB", torch.float32, VOLTA) is None  # no TF32


@pytest.mark.parametrize("name", ["NVIDIA A10G",  # AWS's A10 variant: lower tensor rate
                                  "NVIDIA A100-SXM4-40GB MIG 1g.5gb",  # a slice of the GPU
                                  "NVIDIA RTX PRO 6000 Blackwell", "AMD Instinct MI300X"])
def test_unknown_gpus_and_mig_slices_are_measured(name):
    assert gpu_peak_flops(name, torch.bfloat16, HOPPER) is None


def fake_gpu(monkeypatch, name, capability=HOPPER, native_bf16=True):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native_bf16 or including_emulation)
    monkeypatch.setattr(device_mod, "measure_matmul_flops", lambda precision: -1.0)


def test_peak_flops_reads_the_table_and_falls_back_to_measuring(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3")
    bf16 = resolve_precision(torch.device("cuda"), "auto")
    assert peak_flops(bf16) == 989e12
    fake_gpu(monkeypatch, "NVIDIA A10G")
    assert peak_flops(bf16) == -1.0


def test_cuda_precision_is_bf16_from_ampere_and_fp16_with_loss_scaling_before(monkeypatch):
    cuda = torch.device("cuda")
    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3")
    precision = resolve_precision(cuda, "auto")
    assert precision.dtype == torch.bfloat16 and not precision.needs_grad_scaler
    fake_gpu(monkeypatch, "Tesla V100-SXM2-16GB", VOLTA, native_bf16=False)
    precision = resolve_precision(cuda, "auto")
    assert precision.dtype == torch.float16 and precision.needs_grad_scaler
    assert resolve_precision(cuda, "float32").dtype == torch.float32


def test_explicit_bf16_on_a_gpu_without_it_warns(monkeypatch, caplog):
    fake_gpu(monkeypatch, "Tesla V100-SXM2-16GB", VOLTA, native_bf16=False)
    assert resolve_precision(torch.device("cuda"), "bfloat16").dtype == torch.bfloat16
    assert "emulated" in caplog.text


@pytest.fixture
def restore_tf32_flags():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_tf32_is_enabled_on_cuda_only_and_compile_can_still_read_it(restore_tf32_flags):
    torch.backends.cuda.matmul.allow_tf32 = False
    enable_tf32(torch.device("cpu"))
    assert not torch.backends.cuda.matmul.allow_tf32
    enable_tf32(torch.device("cuda"))  # sets global flags: no GPU needed to check them
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    # Inductor keys its caches on this getter, which raises after a mix of old and new APIs.
    assert torch.get_float32_matmul_precision() == "high"
