"""Weight-only int8 inference: each linear layer's weights as int8 with one scale per row.

Decoding one token at a time is memory-bound: every step reads all the weights once. Storing them
as int8 instead of float32 (or bfloat16) cuts those bytes by 4x (2x), at a small loss of
precision. The scheme is the simplest that keeps quality (as in LLM.int8(), Dettmers et al.,
2022, https://arxiv.org/abs/2208.07339, without its outlier split, and GPTQ's round-to-nearest
baseline): per output channel (row) ``i``, ``scale_i = max_j |W_ij| / 127`` and
``W8_ij = round(W_ij / scale_i)``, symmetric, no zero point. The activations stay in floating
point; ``y = (x @ W8^T) * scale + b`` is exact algebra, because the scale is per output.

On a CPU the product runs in ``torch._weight_int8pack_mm`` (int8 weights, float activations,
dequantised inside the kernel), with the activations rounded to bfloat16 where the CPU computes
in it natively (the kernel is several times faster so). On a GPU the int8 matrix is cast to the
activations' dtype for ``F.linear`` and the scale applied to the output, so only the cast copy
is transient.

Quantised: the linear layers of the blocks (attention q/k/v and output, MLPs, MoE experts). Kept:
embeddings, norms, routers and the output layer (``lm_head``, often tied to the embedding, and
the layer whose errors reach the logits directly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gptforge.runtime.device import cpu_has_native_bf16

QUANTIZATIONS = ("int8",)


class Int8Linear(nn.Module):
    """An ``nn.Linear`` with int8 weights (out, in) and per-row scales (out,)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        self.register_buffer("weight_int8", torch.round(weight / scale[:, None])
                             .clamp(-127, 127).to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias

    # On a CPU with native bfloat16 the int8 kernel is several times faster with bfloat16
    # activations than with float32 ones (which it does not vectorise); set by quantize_int8.
    cpu_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features)  # (N, in)
        if x.device.type == "cpu":
            x = x.to(self.cpu_dtype or dtype).contiguous()
            y = torch._weight_int8pack_mm(x, self.weight_int8, self.scale.to(x.dtype)).to(dtype)
        else:
            y = F.linear(x, self.weight_int8.to(dtype)) * self.scale.to(dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: nn.Module, cpu_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace the linear layers of ``model.blocks`` by :class:`Int8Linear`, in place.

    ``cpu_dtype``: the activations' dtype inside the int8 product on a CPU (None: bfloat16 where
    the CPU has it natively, else the input's dtype).
    """
    if cpu_dtype is None and cpu_has_native_bf16():
        cpu_dtype = torch.bfloat16
    for block in model.blocks:
        for name, module in list(block.named_modules()):
            if isinstance(module, nn.Linear) and not name.endswith("router"):
                parent_name, _, child = name.rpartition(".")
                quantized = Int8Linear(module)
                quantized.cpu_dtype = cpu_dtype
                setattr(block.get_submodule(parent_name), child, quantized)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, shared tensors counted once."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total
