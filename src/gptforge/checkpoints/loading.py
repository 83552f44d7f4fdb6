"""A usable model from any checkpoint: full weights, or LoRA adapters on top of a base checkpoint.

A full checkpoint's ``model.safetensors`` holds every weight. A LoRA checkpoint (written by
``gptforge sft``/``dpo`` with ``lora.rank > 0``) holds only the adapters; its ``model.json`` has a
``lora`` entry naming the base checkpoint and the sha256 of the base's weights
(:func:`gptforge.checkpoints.format.weights_sha256`: of ``model.safetensors``, for a full base)::

    "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["qkv", "proj", "up", "down"],
             "base": "/runs/pretrain/ckpt/step-005000", "base_sha256": "9f2c..."}

Rebuilding such a model means: the architecture from the config, the base weights from ``base``
(a relative path is taken relative to the LoRA checkpoint), verified against ``base_sha256`` so
that adapters are never silently applied to weights they were not trained on, then the adapters
(loaded strictly), and for inference the adapters merged into the weights (``model/lora.py``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from gptforge.checkpoints.format import (
    has_weights,
    load_weights,
    model_config_of,
    read_meta,
    read_safetensors,
    weights_sha256,
)
from gptforge.errors import GptforgeError
from gptforge.model.gpt import GPT
from gptforge.model.lora import apply_lora, lora_state_dict, merge_lora

LORA_KEYS = ("rank", "alpha", "dropout", "targets", "base", "base_sha256")
# Model-config fields that do not change which weights fit the network or what it computes at
# inference, so a fine-tuning run may change them without breaking its adapters' base.
_TRAINING_ONLY_FIELDS = ("dropout",)


def build_model(ckpt: str | Path, *, merge: bool = True) -> GPT:
    """The checkpoint's model in float32 on the CPU, in eval mode.

    For a LoRA checkpoint the adapters are applied to the verified base weights and, with
    ``merge`` (the default), folded into them, giving a plain :class:`GPT`; ``merge=False`` keeps
    the :class:`~gptforge.model.lora.LoRALinear` layers (base frozen), e.g. to compare or to
    continue training.
    """
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    model = GPT(model_config_of(meta, ckpt))
    if "lora" not in meta:
        load_weights(model, ckpt)
        check_finite(model, ckpt)
        return model.eval()
    lora = lora_settings(meta, ckpt)
    load_base_weights(model, ckpt, lora)
    try:
        apply_lora(model, lora["rank"], lora["alpha"], lora["dropout"], list(lora["targets"]))
    except ValueError as err:
        raise GptforgeError(f"{ckpt}/model.json: invalid lora settings ({err})") from None
    load_adapters(model, ckpt)
    check_finite(model, ckpt)
    if merge:
        merge_lora(model)
        untied = model.config.tie_embeddings and model.lm_head.weight is not model.tok_emb.weight
        if untied:  # an adapter on a tied output layer gave it weights of its own
            model.config = dataclasses.replace(model.config, tie_embeddings=False)
    return model.eval()


def check_finite(model: GPT, ckpt: Path) -> None:
    """Refuse weights holding NaN or infinity: such a model only ever outputs garbage."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise GptforgeError(f"{ckpt}: weight {name} holds NaN or infinite values (the run "
                                "had diverged when it was saved); use an earlier checkpoint")


def lora_settings(meta: dict, ckpt: Path) -> dict:
    """The ``lora`` entry of a checkpoint's meta, checked for completeness."""
    lora = meta["lora"]
    missing = [k for k in LORA_KEYS if not isinstance(lora, dict) or k not in lora]
    if missing:
        raise GptforgeError(f"{ckpt}/model.json: the lora entry lacks {', '.join(missing)}; "
                            "the checkpoint is damaged or was written by another tool")
    return lora


def base_checkpoint(ckpt: Path, lora: dict) -> Path:
    """The base checkpoint directory ``lora["base"]`` (a relative path is relative to ``ckpt``)."""
    base = Path(lora["base"]).expanduser()
    if not base.is_absolute():
        base = Path(os.path.normpath(Path(ckpt) / base))
    if not has_weights(base):
        raise GptforgeError(f"{ckpt} holds LoRA adapters for the base checkpoint {base}, which "
                            "is missing (no weights there); put the base back or set "
                            f"lora.base in {ckpt}/model.json to where it is now")
    return base


def load_base_weights(model: GPT, ckpt: Path, lora: dict) -> Path:
    """Load the verified base weights of LoRA checkpoint ``ckpt``; return the base's path."""
    base = base_checkpoint(ckpt, lora)
    actual = weights_sha256(base)
    if actual != lora["base_sha256"]:
        raise GptforgeError(f"the weights of {base} have changed since the adapters in {ckpt} "
                            f"were trained on it (sha256 {actual[:12]}..., expected "
                            f"{str(lora['base_sha256'])[:12]}...); point lora.base at the "
                            "original base checkpoint")
    base_meta = read_meta(base)
    if "lora" in base_meta:
        raise GptforgeError(f"{base} (the base of {ckpt}) holds adapters itself; stacked "
                            f"adapters are not supported: export it with --merge-lora and "
                            "fine-tune from the export")
    _check_same_architecture(model, base_meta["model"], base, ckpt)
    load_weights(model, base)
    return base


def _check_same_architecture(model: GPT, base_config: dict, base: Path, ckpt: Path) -> None:
    ours = model.config.to_dict()
    differ = sorted(k for k in set(ours) | set(base_config)
                    if k not in _TRAINING_ONLY_FIELDS and ours.get(k) != base_config.get(k))
    if differ:
        raise GptforgeError(f"{ckpt} and its base {base} have different model configs "
                            f"({', '.join(differ)}); the adapters do not belong to this base")


def load_adapters(model: GPT, ckpt: Path) -> None:
    """Load the adapter tensors of ``ckpt`` strictly: exactly the model's adapters, same shapes."""
    adapters = read_safetensors(Path(ckpt) / "model.safetensors")
    expected = set(lora_state_dict(model))
    if set(adapters) != expected:
        diff = sorted(set(adapters) ^ expected)[:3]
        raise GptforgeError(f"{ckpt}: adapter weights do not fit the model's LoRA layers "
                            f"(mismatched names: {diff})")
    try:
        model.load_state_dict(adapters, strict=False)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()[:300]
        raise GptforgeError(f"{ckpt}: adapter weights do not fit the model ({first})") from None
