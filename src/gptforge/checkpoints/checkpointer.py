"""The trainer's checkpointer: save a step, restore one, prune old ones, keep the pointers.

The training loop calls ``checkpointer.save(...)`` at a checkpoint step and
``checkpointer.restore(ckpt, ...)`` on resume or rollback, and needs to know nothing else about
files (the split torchtitan's ``CheckpointManager`` makes). What a run saves is fixed when the
checkpointer is built, from the config and the stage:

- the format: *full* (rank 0 gathers and writes ``model.safetensors`` and the optimizer) or
  *sharded* (every rank writes its part with DCP; see ``state.py``);
- which weights: all of them, or only those a ``weights_filter`` keeps (LoRA adapters), with
  ``extra_meta`` saying so in ``model.json``; ``load_weights`` reads back what was saved;
- the tokenizer copied into every checkpoint, and the retention policy (newest ``keep_last``, best
  ``keep_best`` by val loss), applied after each save together with the ``best`` pointer.

Every method that touches model or optimizer state is a collective: call it on every rank.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from gptforge import atomic
from gptforge.checkpoints import state
from gptforge.checkpoints.format import (
    CKPT_DIR,
    SHARDED_MODEL,
    SHARDED_OPTIMIZER,
    is_sharded,
    latest_checkpoint,
    load_trainer_state,
    read_weights,
    save_checkpoint,
    staging_dir,
)
from gptforge.errors import GptforgeError
from gptforge.runtime import distributed
from gptforge.runtime.distributed import DistInfo

WeightsFilter = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def load_full_weights(model: nn.Module, ckpt: Path) -> None:
    """All weights of a full checkpoint into ``model``, plain or sharded (on every rank)."""
    state.load_full_model_state(model, read_weights(ckpt, model))


class Checkpointer:
    def __init__(self, run_dir: Path, *, tokenizer_dir: Path, tokenizer_info: dict,
                 sharded: bool = False, keep_last: int = 2, keep_best: int = 1,
                 dist_info: DistInfo = DistInfo(), weights_filter: WeightsFilter | None = None,
                 extra_meta: dict | None = None,
                 load_weights: Callable[[nn.Module, Path], None] | None = None):
        self.run_dir = Path(run_dir)
        self.tokenizer_dir, self.tokenizer_info = Path(tokenizer_dir), tokenizer_info
        # Adapters (a weights filter) are small: they are always saved in full.
        self.sharded = sharded and weights_filter is None
        self.keep_last, self.keep_best = keep_last, keep_best
        self.dist = dist_info
        self.weights_filter, self.extra_meta = weights_filter, extra_meta or {}
        self.load_weights = load_weights or load_full_weights

    # ---- pointers ------------------------------------------------------------------------
    def latest(self) -> Path | None:
        """The newest complete checkpoint of the run (what ``latest`` points at), or None."""
        return latest_checkpoint(self.run_dir)

    # ---- save ----------------------------------------------------------------------------
    def save(self, step: int, model: nn.Module, optimizer, trainer_state: dict, *,
             model_config, val_loss: float | None) -> None:
        """Checkpoint ``step``: collectives on every rank, then rank 0 finishes it.

        Full: every rank takes part in gathering the weights and optimizer state to rank 0,
        which writes them. Sharded: every rank writes its own part into the staging directory,
        then rank 0 adds the small files and renames the directory into place. ``trainer_state``
        is the loop's state without the optimizer, which is added here.
        """
        weights, staged = None, None
        trainer_state = dict(trainer_state)
        if self.sharded:
            staged = staging_dir(self.run_dir, step)
            if self.dist.is_main:  # left over from a crash in the middle of this same save
                shutil.rmtree(staged, ignore_errors=True)
            distributed.barrier(self.dist)
            state.save_sharded_model(model, staged / SHARDED_MODEL)
            state.save_sharded_optimizer(model, optimizer,
                                         staged / SHARDED_OPTIMIZER)
        else:
            weights = state.full_model_state(model)
            if self.weights_filter is not None:
                weights = self.weights_filter(weights)
            weights = state.weights_to_save(model, weights)
            trainer_state["optimizer"] = state.full_optimizer_state(model, optimizer)
        if self.dist.is_main:
            save_checkpoint(
                self.run_dir, step=step, weights=weights, staged=staged,
                model_config=model_config, tokenizer_dir=self.tokenizer_dir,
                tokenizer_info=self.tokenizer_info, trainer_state=trainer_state,
                extra_meta=self.extra_meta, val_loss=val_loss)
            self.prune()
        distributed.barrier(self.dist)

    # ---- restore -------------------------------------------------------------------------
    def restore(self, ckpt: Path, model: nn.Module, optimizer) -> dict:
        """Load the weights and optimizer state of ``ckpt`` into ``model`` and ``optimizer``;
        return the rest of its trainer state (loop, loader, RNG) for the loop to restore."""
        ckpt = Path(ckpt)
        trainer_state = load_trainer_state(ckpt)
        if is_sharded(ckpt):
            state.load_sharded_model(model, ckpt / SHARDED_MODEL)
            state.load_sharded_optimizer(model, optimizer, ckpt / SHARDED_OPTIMIZER)
            return trainer_state
        self.load_weights(model, ckpt)
        if "optimizer" not in trainer_state:
            raise GptforgeError(f"{ckpt}/trainer_state.pt holds no optimizer state; the "
                                "checkpoint is damaged")
        state.load_full_optimizer_state(model, optimizer, trainer_state.pop("optimizer"))
        return trainer_state

    # ---- retention -----------------------------------------------------------------------
    def prune(self) -> list[Path]:
        """Delete checkpoints that are neither among the newest ``keep_last`` nor the best
        ``keep_best``, and what a crash in the middle of a save left behind; point ``best`` at
        the lowest val loss. Returns what was removed."""
        return prune_checkpoints(self.run_dir, self.keep_last, self.keep_best)


def prune_checkpoints(run_dir: Path, keep_last: int, keep_best: int) -> list[Path]:
    """See :meth:`Checkpointer.prune` (rank 0 only, between saves)."""
    root = Path(run_dir) / CKPT_DIR
    ckpts = sorted((p for p in root.glob("step-*") if (p / "model.json").is_file()),
                   key=lambda p: int(p.name.split("-")[1]))
    losses = {p: json.loads((p / "model.json").read_text()).get("val_loss") for p in ckpts}
    keep = set(ckpts[-keep_last:]) if keep_last > 0 else set()
    scored = sorted((loss, p) for p, loss in losses.items() if loss is not None)
    keep |= {p for _, p in scored[:max(0, keep_best)]}
    latest = latest_checkpoint(run_dir)
    keep |= {latest} if latest else set()
    removed = [p for p in ckpts if p not in keep]
    # Called between saves, so no temporary directory here is still being written.
    removed += [p for p in root.glob(".tmp-*") if p.is_dir()]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    if scored:
        best = scored[0][1]
        atomic.write_text(Path(run_dir) / "best", f"{CKPT_DIR}/{best.name}\n")
    return removed
