"""Tiny checkpoints built in-process: a char tokenizer, a random GPT, and LoRA adapters on it."""

from __future__ import annotations

from pathlib import Path

import torch

from gptforge.checkpoints.format import save_checkpoint, weights_sha256
from gptforge.checkpoints.state import weights_to_save
from gptforge.model import GPT, ModelConfig
from gptforge.model.lora import apply_lora, lora_config_of, lora_state_dict
from gptforge.tokenizer import train_tokenizer

# Letters, digits, punctuation and the characters of the chat markers ("<|user|>" typed as text).
CHARS_TEXT = ("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;!?'-\n<|>"
              "hello, how are you? I am fine.")


def make_tokenizer(directory: Path):
    tokenizer = train_tokenizer("char", [CHARS_TEXT])
    tokenizer.save(directory)
    return tokenizer


def tiny_config(vocab_size: int, **overrides) -> ModelConfig:
    fields = dict(vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=64)
    return ModelConfig(**{**fields, **overrides})


def save_model(run_dir: Path, model: GPT, tokenizer, tokenizer_dir: Path, *,
               weights: dict[str, torch.Tensor] | None = None,
               extra_meta: dict | None = None) -> Path:
    if weights is None:
        weights = weights_to_save(model, model.state_dict())
    return save_checkpoint(
        run_dir, step=1, weights=weights, model_config=model.config, tokenizer_dir=tokenizer_dir,
        tokenizer_info={"kind": tokenizer.kind, "sha256": tokenizer.fingerprint()},
        trainer_state={"step": 1}, val_loss=None, extra_meta=extra_meta)


def make_base(tmp_path: Path, **config) -> tuple[Path, GPT, object]:
    """(checkpoint dir, model, tokenizer) of a random tiny model with a char tokenizer."""
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer = make_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = GPT(tiny_config(tokenizer.vocab_size, **config)).eval()
    return save_model(tmp_path / "base", model, tokenizer, tokenizer_dir), model, tokenizer


def randomize_adapters(model: torch.nn.Module, std: float = 0.05) -> None:
    """Give ``lora_b`` non-zero values, as training would, so the adapters change the output."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_b"):
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def make_lora_checkpoint(tmp_path: Path, base: Path, model: GPT, tokenizer,
                         targets=("qkv", "proj", "up", "down")) -> Path:
    """Put rank-4 adapters on ``model`` (in place), randomize them, save them as ``base``'s."""
    apply_lora(model, rank=4, alpha=8.0, dropout=0.0, targets=list(targets))
    randomize_adapters(model)
    lora = {**lora_config_of(model), "base": str(base),
            "base_sha256": weights_sha256(base)}
    return save_model(tmp_path / "sft", model, tokenizer, base / "tokenizer",
                      weights=lora_state_dict(model), extra_meta={"lora": lora})
