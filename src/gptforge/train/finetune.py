"""Fine-tuning stages: supervised fine-tuning (SFT) and direct preference optimisation (DPO).

Both start from a trained checkpoint (``init_from``: a gptforge checkpoint or run, or a Hugging
Face directory, resolved as for continued pretraining in ``init_from.py``), whose architecture
and tokenizer they keep, and run the same training loop as pretraining with other batches and
another objective:

- **SFT** trains on conversations with the loss on the assistant's tokens only, so the model learns
  to answer rather than to imitate the user.
- **DPO** (Rafailov et al., 2023) trains on pairs of a preferred and a rejected answer to the same
  prompt, against a frozen copy of the starting model (the *reference*): it raises the preferred
  answer's likelihood relative to the reference more than the rejected one's.

Either can train all weights or, with ``lora.rank > 0``, only low-rank adapters (Hu et al., 2021),
in which case checkpoints hold only the adapters plus the path and hash of the base checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import torch

from gptforge.checkpoints.checkpointer import load_full_weights
from gptforge.checkpoints.format import load_weights, read_meta, weights_sha256
from gptforge.config.schema import Config
from gptforge.errors import GptforgeError
from gptforge.model.config import ModelConfig
from gptforge.model.gpt import GPT
from gptforge.train.freeze import freeze
from gptforge.train.init_from import StartingPoint
from gptforge.train.objectives import DirectPreference, MaskedLanguageModeling, Objective
from gptforge.train.pretraining import init_optimizer

log = logging.getLogger(__name__)


class _FromCheckpoint:
    """What SFT and DPO share: the model, tokenizer and weights of ``finetune.init_from``, LoRA
    adapters when ``lora.rank > 0``, records split into train and val."""

    name = ""

    def __init__(self, model_overrides: tuple[str, ...] | list[str] = ()):
        # The model.* keys set on the command line: they must agree with the checkpoint.
        self.model_overrides = tuple(model_overrides)

    # ---- model and tokenizer from the starting checkpoint ---------------------------------
    def setup(self, cfg: Config, dist_info) -> tuple[Config, Path, dict]:
        if not cfg.finetune.init_from:
            raise GptforgeError(f"gptforge {self.name} needs a checkpoint to start from: "
                                "init_from=RUN_DIR_OR_CKPT_OR_HF_DIR")
        self.start = StartingPoint.resolve(cfg.finetune.init_from, cfg.model,
                                           self.model_overrides, Path(cfg.train.out_dir),
                                           dist_info)
        self.base = self.start.ckpt
        model = self.model_config(self.start.model_config)
        for key in self.model_overrides:  # a setting this stage fixes (DPO: no dropout)
            if getattr(model, key) != getattr(cfg.model, key):
                raise GptforgeError(f"model.{key}={getattr(cfg.model, key)} does not apply to "
                                    f"gptforge {self.name}, which uses {getattr(model, key)}; "
                                    f"drop model.{key}")
        return dataclasses.replace(cfg, model=model), self.base / "tokenizer", \
            self.start.meta["tokenizer"]

    def model_config(self, saved: ModelConfig) -> ModelConfig:
        """The architecture to fine-tune: the starting checkpoint's."""
        return saved

    def init_weights(self, cfg: Config, model: GPT) -> None:
        load_weights(model, self.base)

    def init_optimizer(self, cfg: Config, model: GPT, optimizer) -> None:
        init_optimizer(cfg, self.start, model, optimizer)

    # ---- objective, LoRA ---------------------------------------------------------------------
    def build_objective(self, cfg: Config, model: GPT) -> Objective:
        raise NotImplementedError

    @staticmethod
    def add_adapters(cfg: Config, model: GPT) -> None:
        """LoRA adapters on ``lora.targets`` when ``lora.rank > 0`` (the base frozen)."""
        if cfg.lora.rank <= 0:
            return
        from gptforge.model.lora import apply_lora

        targets = [t.strip() for t in cfg.lora.targets.split(",") if t.strip()]
        try:
            wrapped = apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, targets)
        except ValueError as err:
            raise GptforgeError(f"lora.targets: {err}") from None
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("LoRA rank %d on %d layers: %.3fM trainable of %.2fM parameters",
                 cfg.lora.rank, len(wrapped), trainable / 1e6, model.num_params() / 1e6)

    def checkpoint_extras(self, cfg: Config, model: GPT):
        # model.json says so (`gptforge chat` warns without it) and names the chat template, so
        # chat, serve and generate render conversations as the model was trained on them.
        marker = {"fine_tuned": self.name, "chat_template": self.template_name(cfg)}
        if cfg.lora.rank <= 0:
            return None, marker
        from gptforge.model.lora import lora_config_of

        lora = {**lora_config_of(model), "base": str(self.base),
                "base_sha256": weights_sha256(self.base)}
        return (lambda weights: {k: v for k, v in weights.items() if ".lora_" in k}), \
            {"lora": lora, **marker}

    def load_run_weights(self, model: GPT, ckpt: Path) -> None:
        """Resume: full weights, or for LoRA runs the adapters on top of the base weights."""
        meta = read_meta(ckpt)
        if "lora" not in meta:
            load_full_weights(model, ckpt)
            return
        from gptforge.checkpoints.loading import load_adapters

        load_adapters(model, ckpt)

    def template_name(self, cfg: Config) -> str:
        """``finetune.chat_template``, or the starting checkpoint's, or gptforge's own."""
        if cfg.finetune.chat_template:
            return cfg.finetune.chat_template
        base = getattr(self, "base", None)  # set by setup()
        return read_meta(base).get("chat_template", "gptforge") if base else "gptforge"

    # ---- data ---------------------------------------------------------------------------------
    def loaders(self, cfg: Config, dist_info, run_dir: Path):
        from gptforge.tokenizer import load_tokenizer
        from gptforge.tokenizer.chat_template import chat_template

        tokenizer = load_tokenizer(self.base / "tokenizer")
        self.template = chat_template(self.template_name(cfg), tokenizer)
        paths = [p.strip() for p in cfg.finetune.data.split(",") if p.strip()]
        if not paths:
            raise GptforgeError(f"gptforge {self.name} needs data: finetune.data=FILE.jsonl")
        records = self.read_records(paths)
        train_records, val_records = split_records(records, cfg.finetune.val_fraction,
                                                   cfg.train.seed)
        log.info("%s data: %d train and %d val records from %s", self.name, len(train_records),
                 len(val_records), ", ".join(paths))
        common = {"rank": dist_info.rank, "world_size": dist_info.world_size}
        train = self.loader(tokenizer, train_records, cfg, seed=cfg.train.seed, **common)
        val = self.loader(tokenizer, val_records, cfg, seed=cfg.train.seed + 1, **common) \
            if val_records else None
        return train, val

    def read_records(self, paths: list[str]) -> list:
        raise NotImplementedError

    def loader(self, tokenizer, records, cfg: Config, **kwargs):
        raise NotImplementedError


class SupervisedFinetuning(_FromCheckpoint):
    """SFT: conversations, the loss on the assistant's tokens only."""

    name = "sft"

    def build_objective(self, cfg: Config, model: GPT) -> Objective:
        self.add_adapters(cfg, model)
        freeze(model, cfg.train.freeze)
        return MaskedLanguageModeling()

    def read_records(self, paths: list[str]) -> list:
        from gptforge.data.conversations import read_conversations

        return read_conversations(paths)

    def loader(self, tokenizer, records, cfg: Config, **kwargs):
        from gptforge.data.finetune_loader import SFTLoader, encode_sft_examples

        loader = SFTLoader(encode_sft_examples(tokenizer, records, self.template),
                           cfg.model.block_size,
                           cfg.train.batch_size, pad_id=tokenizer.pad_id,
                           packing=cfg.finetune.packing, **kwargs)
        _warn_truncated(loader, cfg)
        return loader


class PreferenceOptimization(_FromCheckpoint):
    """DPO: pairs of a chosen and a rejected answer, against a frozen reference model."""

    name = "dpo"

    def model_config(self, saved: ModelConfig) -> ModelConfig:
        # Dropout would make the policy's log-ratios noisy against the (eval-mode) reference:
        # at the first step the loss would not even be ln 2. DPO runs without it.
        return dataclasses.replace(saved, dropout=0.0)

    def build_objective(self, cfg: Config, model: GPT) -> Objective:
        # A frozen copy of the starting policy, taken before any adapters are added.
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.add_adapters(cfg, model)
        freeze(model, cfg.train.freeze)
        return DirectPreference(reference, beta=cfg.dpo.beta, sft_weight=cfg.dpo.sft_weight)

    def read_records(self, paths: list[str]) -> list:
        from gptforge.data.conversations import read_preferences

        return read_preferences(paths)

    def loader(self, tokenizer, records, cfg: Config, **kwargs):
        from gptforge.data.finetune_loader import PreferenceLoader, encode_preference_examples

        loader = PreferenceLoader(encode_preference_examples(tokenizer, records, self.template),
                                  cfg.model.block_size, cfg.train.batch_size,
                                  pad_id=tokenizer.pad_id, **kwargs)
        _warn_truncated(loader, cfg)
        return loader


STAGES = {"sft": SupervisedFinetuning, "dpo": PreferenceOptimization}


def _warn_truncated(loader, cfg: Config) -> None:
    if getattr(loader, "truncated", 0):
        log.warning("%d examples are longer than model.block_size=%d tokens and were cut; %d of "
                    "them had no answer left and were dropped", loader.truncated,
                    cfg.model.block_size, getattr(loader, "dropped", 0))


def split_records(records: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded split into (train, val); val gets round(fraction * n) records, at least one if
    the fraction is positive and there are two or more records."""
    if not records:
        raise GptforgeError("the fine-tuning data holds no records")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = round(val_fraction * len(records))
    if val_fraction > 0 and len(records) >= 2:
        n_val = max(1, n_val)
    val_idx = set(order[:n_val])
    return ([r for i, r in enumerate(records) if i not in val_idx],
            [r for i, r in enumerate(records) if i in val_idx])
