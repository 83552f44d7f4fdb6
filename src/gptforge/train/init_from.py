"""Starting a new run from trained weights (``init_from``), for every stage.

``init_from`` names a gptforge checkpoint, a run directory (its latest checkpoint) or a Hugging
Face ``transformers`` directory, which is imported once into ``RUN_DIR/imported``
(``checkpoints/hf_import.py``). The run takes the checkpoint's architecture and weights; data,
schedule and step count are its own, and the optimizer starts fresh unless
``train.init_optimizer`` carries the checkpoint's moments over. That is the difference from
``--resume``, which continues the *same* run exactly (its data position, schedule and RNG).

The architecture is the checkpoint's: the ``[model]`` section of a preset or file is replaced.
A ``model.KEY=VALUE`` given on the command line must agree with it, except the settings that do
not change what the weights mean: ``dropout``, the MoE loss weights and, with rotary or sine
positions (no position weights), ``block_size``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gptforge.checkpoints import state
from gptforge.checkpoints.format import (
    is_sharded,
    load_trainer_state,
    model_config_of,
    read_meta,
    resolve_checkpoint,
)
from gptforge.checkpoints.hf_import import import_huggingface, is_huggingface_dir
from gptforge.errors import GptforgeError
from gptforge.model.config import ModelConfig
from gptforge.runtime import distributed

log = logging.getLogger(__name__)

IMPORTED_DIR = "imported"  # where a run keeps the import of a Hugging Face init_from
# Model settings a run may change from its starting checkpoint: training-time only.
TRAINING_ONLY = ("dropout", "moe_aux_loss_coef", "moe_z_loss_coef")


@dataclass(frozen=True)
class StartingPoint:
    """The checkpoint a run starts from: its directory, ``model.json`` and architecture."""

    ckpt: Path
    meta: dict
    model_config: ModelConfig

    @classmethod
    def resolve(cls, init_from: str, model: ModelConfig, explicit: Iterable[str],
                run_dir: Path, dist_info) -> StartingPoint:
        """``init_from`` as a full checkpoint (an HF directory imported into ``run_dir``), with
        the explicitly given ``model.*`` settings checked against its architecture."""
        ckpt = _checkpoint(init_from, run_dir, dist_info)
        meta = read_meta(ckpt)
        if "lora" in meta:
            raise GptforgeError(f"{ckpt} holds LoRA adapters only; merge them first with "
                                f"`gptforge export {ckpt} --merge-lora --out DIR` and start "
                                "from DIR")
        saved = model_config_of(meta, ckpt)
        return cls(ckpt, meta, architecture(saved, model, explicit, init_from))

    def check_tokenizer(self, sha256: str | None, data_dir: Path) -> None:
        """Refuse data tokenized with another tokenizer than the checkpoint's."""
        if self.meta.get("tokenizer", {}).get("sha256") != sha256:
            raise GptforgeError(
                f"init_from {self.ckpt} was trained with another tokenizer than the data in "
                f"{data_dir} (fingerprints differ); prepare the data with its tokenizer: "
                f"`gptforge prepare --input FILES --tokenizer {self.ckpt}/tokenizer --out DIR`")

    def load_optimizer_state(self, model, optimizer) -> None:
        """``train.init_optimizer``: the checkpoint's optimizer moments, this run's settings
        (learning rate, betas, weight decay); refused unless the parameters are the same."""
        where = f"train.init_optimizer: {self.ckpt}"
        if is_sharded(self.ckpt) or not (self.ckpt / "trainer_state.pt").is_file():
            raise GptforgeError(f"{where} has no full optimizer state (an import, an export or "
                                "a sharded checkpoint); drop train.init_optimizer")
        saved = load_trainer_state(self.ckpt).get("optimizer")
        parts = getattr(optimizer, "optimizers", [optimizer])
        if not isinstance(saved, dict) or len(saved.get("optimizers", [])) != len(parts):
            raise GptforgeError(f"{where} was trained with another optimizer (optim.name); "
                                "drop train.init_optimizer or use the same optim.name")
        current = state.full_optimizer_state(model, optimizer)["optimizers"]
        merged = [_with_settings(old, new, where)
                  for old, new in zip(saved["optimizers"], current)]
        state.load_full_optimizer_state(model, optimizer, {"optimizers": merged})
        log.info("optimizer state carried over from %s", self.ckpt)


def _checkpoint(init_from: str, run_dir: Path, dist_info) -> Path:
    """A full gptforge checkpoint for ``init_from``, importing a Hugging Face directory first."""
    if not is_huggingface_dir(init_from):
        return resolve_checkpoint(init_from).resolve()
    target = Path(run_dir) / IMPORTED_DIR
    source = str(Path(init_from).resolve())
    if dist_info.is_main and _imported_from(target) != source:
        import_huggingface(init_from, target)
    distributed.barrier(dist_info)
    return target.resolve()


def _imported_from(ckpt: Path) -> str | None:
    """The Hugging Face directory ``ckpt`` was imported from (None if it is not an import)."""
    try:
        return json.loads((ckpt / "model.json").read_text())["imported_from"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def architecture(saved: ModelConfig, model: ModelConfig, explicit: Iterable[str],
                 source: str) -> ModelConfig:
    """The checkpoint's architecture with the explicit ``model.*`` settings that may differ;
    one that contradicts it is refused, naming the key."""
    changes = {}
    for key in explicit:
        value, theirs = getattr(model, key), getattr(saved, key)
        if value == theirs:
            continue
        weightless = key == "block_size" and saved.pos_emb != "learned"
        if key not in TRAINING_ONLY and not weightless:
            raise GptforgeError(
                f"model.{key}={value} contradicts init_from {source} (its {key} is {theirs}); "
                f"the architecture comes from the checkpoint: drop model.{key}, or train from "
                "scratch without init_from")
        changes[key] = value
    return dataclasses.replace(saved, **changes)


def _with_settings(saved: dict, current: dict, where: str) -> dict:
    """The saved per-parameter state under the current parameter groups' settings."""
    if "param_groups" not in saved or "state" not in saved:
        raise GptforgeError(f"{where}: its optimizer state is not in the full format")
    if [g["params"] for g in saved["param_groups"]] != \
            [g["params"] for g in current["param_groups"]]:
        ours = {n for g in current["param_groups"] for n in g["params"]}
        theirs = {n for g in saved["param_groups"] for n in g["params"]}
        differ = sorted(ours ^ theirs)[:3] or ["(grouped differently)"]
        raise GptforgeError(f"{where} optimized other parameters than this run trains "
                            f"({', '.join(differ)}); drop train.init_optimizer (or train.freeze)")
    return {"state": saved["state"], "param_groups": current["param_groups"]}
