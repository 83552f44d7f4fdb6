"""Low-rank adapters (LoRA): fine-tune a few small matrices next to frozen weights.

LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685) freezes a linear layer's weight ``W``
(out x in) and learns an update of rank ``r`` in factored form, ``delta_W = B @ A`` with
``A`` (r x in) and ``B`` (out x r)::

    y = x @ W.T + b  +  dropout(x) @ A.T @ B.T * (alpha / r)

``B`` starts at zero, so the adapted model is exactly the base model before training; ``A`` starts
random (Kaiming-uniform, as an ``nn.Linear``), so the first gradient of ``B`` is not zero. The
scale ``alpha / r`` keeps the update's size roughly independent of the rank, so a learning rate
tuned for one rank carries over to another.

:class:`LoRALinear` keeps the base layer's ``weight`` and ``bias`` as its own parameters, under the
same names, so ``blocks.0.attn.qkv.weight`` still loads from and saves to a base checkpoint; the
adapters add ``blocks.0.attn.qkv.lora_a`` and ``...lora_b``. A weight shared with another layer
(the output layer tied to the token embedding) stays shared while training; :func:`merge_lora`
gives such a layer a merged copy of its own, since the embedding must not change.

For inference, :func:`merge_lora` folds ``B @ A * alpha / r`` into ``W`` and puts a plain
``nn.Linear`` back, so decoding costs nothing extra (and code that reads ``.weight`` directly,
like the compiled decoder, sees the adapted weights).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``rank`` update, scaled by ``alpha / rank``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 target: str = "", weight_shared: bool = False):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.dropout_p = rank, float(alpha), float(dropout)
        self.scaling = self.alpha / rank
        self.target = target  # the suffix of apply_lora's targets that selected this layer
        self.weight_shared = weight_shared  # the base weight is also another module's parameter
        # The very same Parameter objects: names, sharing and checkpoints are unchanged.
        self.weight = base.weight
        self.bias = base.bias
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        down = F.linear(self.lora_dropout(x), self.lora_a)  # (..., in) -> (..., r)
        update = F.linear(down, self.lora_b)  # (..., r) -> (..., out)
        return base + update * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``B @ A * alpha / rank`` (out x in), computed in float32."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scaling

    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing what this layer computes (dropout aside)."""
        merged = (self.weight.detach().float() + self.delta_weight()).to(self.weight.dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        if self.weight_shared:  # a copy of its own: the other user of the weight keeps W
            linear.weight = nn.Parameter(merged, requires_grad=self.weight.requires_grad)
        else:  # in place: whoever holds this Parameter (an optimizer, a hook) sees the merge
            with torch.no_grad():
                self.weight.copy_(merged)
            linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, alpha={self.alpha:g}, dropout={self.dropout_p:g}")


def linear_suffixes(model: nn.Module) -> list[str]:
    """The last name component of every ``nn.Linear`` in ``model``: the valid LoRA targets."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, nn.Linear)})


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    """ids of parameters registered under more than one name (tied weights)."""
    seen, shared = set(), set()
    for _, param in model.named_parameters(remove_duplicate=False):
        (shared if id(param) in seen else seen).add(id(param))
    return shared


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float,
               targets: list[str]) -> list[str]:
    """Wrap the linear layers named by ``targets`` in :class:`LoRALinear`; freeze the rest.

    A target is a module-name suffix: ``"qkv"`` selects every ``blocks.N.attn.qkv`` (and
    ``"attn.qkv"`` would too), ``"up"`` every MLP's and every expert's up projection. Every
    parameter that is not an adapter gets ``requires_grad = False``. Returns the names of the
    wrapped modules. Raises ValueError for a target that selects no linear layer, for a model
    that already has adapters, or for an invalid rank or dropout.
    """
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    if not targets:
        raise ValueError("no LoRA targets given")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters; merge them first (merge_lora)")
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    unknown = [t for t in targets if not any(_matches(name, t) for name, _ in linears)]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {', '.join(map(repr, unknown))}; this model's "
                         f"linear layers end in: {', '.join(linear_suffixes(model))}")
    shared = _shared_parameter_ids(model)
    wrapped = []
    for name, linear in linears:
        target = next((t for t in targets if _matches(name, t)), None)
        if target is None:
            continue
        lora = LoRALinear(linear, rank, alpha, dropout, target=target,
                          weight_shared=id(linear.weight) in shared)
        _set_submodule(model, name, lora)
        wrapped.append(name)
    for name, param in model.named_parameters():
        param.requires_grad = name.rsplit(".", 1)[-1] in ("lora_a", "lora_b")
    return wrapped


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (``lora_a`` and ``lora_b`` of every LoRA layer)."""
    return [p for _, m in lora_modules(model) for p in (m.lora_a, m.lora_b)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, under their full names (``blocks.0.attn.qkv.lora_a``, ...)."""
    return {f"{name}.{part}": getattr(m, part).detach()
            for name, m in lora_modules(model) for part in ("lora_a", "lora_b")}


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight and put plain ``nn.Linear`` layers back, in place.

    Parameter names do not change, so the result saves and loads like the base model. A weight
    that was shared with another layer (tied embeddings) is untied: the linear layer gets the
    merged copy, the other layer keeps the original.
    """
    for name, module in lora_modules(model):
        _set_submodule(model, name, module.merged_linear())


def lora_config_of(model: nn.Module) -> dict:
    """``{"rank", "alpha", "dropout", "targets"}`` of the model's adapters; ``{}`` if it has none.

    ``targets`` lists the targets of :func:`apply_lora` that selected a layer (in the order the
    layers come in the model), so ``apply_lora(model, **lora_config_of(adapted))`` on a fresh copy
    of the base wraps the same layers.
    """
    modules = [m for _, m in lora_modules(model)]
    if not modules:
        return {}
    settings = {(m.rank, m.alpha, m.dropout_p) for m in modules}
    if len(settings) > 1:
        raise ValueError(f"the model's LoRA layers have different settings {sorted(settings)}")
    rank, alpha, dropout = settings.pop()
    targets = list(dict.fromkeys(m.target for m in modules))
    return {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": targets}
