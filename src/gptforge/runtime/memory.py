"""How much memory a training step needs: an estimate from the config, and a measurement.

The estimate adds four parts. *Weights* and *gradients* are 4 bytes per parameter (float32
master weights; autocast only changes the compute dtype). *Optimizer state* follows the optimizer:
AdamW keeps two float32 moments (8 bytes per parameter), Muon one momentum matrix for the hidden
matrices (4 bytes) and AdamW's two for the rest, Adafactor a row and a column vector per matrix.
*Activations* are what the forward pass saves for the backward pass, counted tensor by tensor for
this architecture (the accounting of Korthikanti et al., 2022, "Reducing Activation Recomputation
in Large Transformer Models", section 4.1, with SDPA's fused kernels never storing the T x T
attention matrix unless dropout forces the unfused path). Per token and block, with width C,
key/value width K (C for plain multi-head attention), MLP up-projection width U and hidden width H:

    saved by the block        elements   tensor
    norm1 output              C          input of the qkv projection
    q, k, v                   C + 2K     the qkv projection's output (q, k, v are views of it)
    attention output          C          saved by SDPA for its backward
    heads merged              C          the reshaped copy, input of the output projection
    residual after attention  C          input of norm2 (float32 even under autocast)
    norm2 output              C          input of the MLP's up projection
    up projection             U          input of the activation (2H for SwiGLU)
    activation output         H          input of the down projection (SwiGLU: silu(gate) too)
    block output              C          input of the next block (float32)

that is 17C per token for a GPT-2 block: Korthikanti's 34sbh bytes at 2 bytes per element.
RoPE and QK-norm add rotated or normalised copies of q and k; dropout adds its masks and, in
attention, the T x T probabilities. A mixture-of-experts MLP keeps, per token, its top-k experts'
gathered inputs, hidden activations and outputs, and the router's float32 logits. Outside the
blocks come the embedding output, the final norm, and the logits: the logits, their float32
log-softmax, and in backward their gradient.

With activation checkpointing (``runtime.activation_checkpointing``) a block keeps only its input;
during backward one block at a time is recomputed, so activations are L block inputs plus one
block's worth.

:class:`AllocationTracker` measures the same quantity on any device, CPU included, by following
every tensor storage that PyTorch operations create (a ``TorchDispatchMode``) and freeing it when
its storage dies; on CUDA it agrees with ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gptforge.model.config import ModelConfig

FLOAT32 = 4


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step's parts, at one micro-batch."""

    weights: int
    grads: int
    optimizer: int
    activations: int  # without activation checkpointing
    activations_checkpointed: int
    autocast_copies: int  # low-precision copies of the matmul weights autocast keeps per step

    def total(self, checkpointing: bool = False) -> int:
        acts = self.activations_checkpointed if checkpointing else self.activations
        return self.weights + self.grads + self.optimizer + self.autocast_copies + acts


def block_elements_per_token(cfg: ModelConfig, seq_len: int,
                             moe: bool = False) -> tuple[int, int, float]:
    """(float32 elements, compute-dtype elements, bytes of masks) one block saves per token."""
    C, K = cfg.n_embd, cfg.kv_heads * cfg.head_size
    H = (cfg.moe_expert_hidden or cfg.hidden_dim) if moe else cfg.hidden_dim
    up = 2 * H if cfg.mlp == "swiglu" else H
    act = {"swiglu": 2 * H, "relu2": 2 * H, "gelu": H}[cfg.mlp]  # relu2: relu, then its square
    mlp = up + act
    fp32 = 2 * C  # the two residual-stream tensors
    if moe:  # top_k experts per token: their inputs gathered, outputs scattered back, weighted
        mlp = cfg.moe_top_k * (C + up + act + C)
        fp32 += 2 * cfg.n_experts  # router logits and probabilities, in float32
    compute = C + (C + 2 * K) + C + C + C + mlp  # norms, qkv, attention, merge, MLP
    if cfg.qk_norm:
        compute += C + K  # normalised q and k
    if cfg.pos_emb == "rope":
        compute += C + K  # rotated q and k
    mask_bytes = 0.0
    if cfg.dropout > 0:
        # Masks (1 byte) and outputs of the two residual dropouts; unfused attention with dropout
        # keeps the probabilities, their dropped copy and a mask per head (T x T each).
        compute += 2 * C
        mask_bytes = 2 * C + cfg.n_head * seq_len * (1 + 2 * 4)
    return fp32, compute, mask_bytes


def activation_bytes(cfg: ModelConfig, batch_size: int, seq_len: int, compute_bytes: int,
                     checkpointing: bool = False) -> int:
    """Bytes of saved activations (and the logits' gradient) for one micro-batch."""
    tokens = batch_size * seq_len

    def block(layer: int) -> float:
        fp32, compute, masks = block_elements_per_token(cfg, seq_len, cfg.is_moe_layer(layer))
        return fp32 * FLOAT32 + compute * compute_bytes + masks

    per_layer = [block(i) for i in range(cfg.n_layer)]
    if checkpointing:  # L block inputs kept, one block recomputed at a time
        blocks = cfg.n_layer * cfg.n_embd * FLOAT32 + max(per_layer)
    else:
        blocks = sum(per_layer)
    V = cfg.padded_vocab_size
    # Embedding output and final norm; logits in the compute dtype, their float32 log-softmax,
    # and the float32 gradient of the logits at the start of backward.
    outside = cfg.n_embd * (FLOAT32 + compute_bytes) + V * compute_bytes + 2 * V * FLOAT32
    if compute_bytes != FLOAT32:
        outside += V * FLOAT32  # the loss's float32 copy of the logits
    return int(tokens * (blocks + outside))


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of state ``optimizer`` (a torch optimizer or an OptimizerChain) will hold."""
    parts = getattr(optimizer, "optimizers", [optimizer])
    total = 0
    for opt in parts:
        for group in opt.param_groups:
            for p in group["params"]:
                total += _state_elements(opt, p) * FLOAT32
    return total


def _state_elements(opt, p: torch.Tensor) -> int:
    if isinstance(opt, torch.optim.Adafactor):  # factored second moment (no first moment)
        if p.dim() < 2:
            return p.numel()
        return p.numel() // p.shape[-1] + p.numel() // p.shape[-2]
    if type(opt).__name__ == "Muon":
        return p.numel()  # one momentum buffer
    return 2 * p.numel()  # AdamW: first and second moments


def estimate(model, optimizer, cfg: ModelConfig, batch_size: int, seq_len: int,
             compute_bytes: int) -> MemoryEstimate:
    """The memory of a training step of ``model`` (its parameters may be on the meta device)."""
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    n_params = sum(p.numel() for p in params)
    n_trainable = sum(p.numel() for p in params if p.requires_grad)
    matmul = sum(p.numel() for p in params if p.dim() == 2)
    copies = matmul * compute_bytes if compute_bytes != FLOAT32 else 0
    return MemoryEstimate(
        weights=n_params * FLOAT32, grads=n_trainable * FLOAT32,
        optimizer=optimizer_state_bytes(optimizer),
        activations=activation_bytes(cfg, batch_size, seq_len, compute_bytes),
        activations_checkpointed=activation_bytes(cfg, batch_size, seq_len, compute_bytes,
                                                  checkpointing=True),
        autocast_copies=copies)


class AllocationTracker(TorchDispatchMode):
    """Peak bytes of live tensor storages while active, counting ``already_live`` tensors too.

    Every tensor an operation returns is followed; its storage is counted once, from the moment
    it appears until it is freed. Storages made outside the mode (the weights, the optimizer
    state) are counted through ``already_live``.
    """

    def __init__(self, already_live=()):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0
        for tensor in already_live:
            self._follow(tensor)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._follow(value)
        return out

    def _follow(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self.live or storage.nbytes() == 0:
            return
        self.live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)
