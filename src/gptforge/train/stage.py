"""The contract between the training loop and a stage (pretraining, SFT, DPO, ...).

Every stage runs the same loop (``loop.py``); a stage says only what differs: where the data and
the tokenizer come from, the initial weights, the objective, the batches, and what a checkpoint
of it holds. ``launch.train(cfg, stage=...)`` calls these in order::

    setup -> init_weights -> build_objective -> init_optimizer (new runs) -> loaders
    -> checkpoint_extras
    (and load_run_weights when a run is resumed or rolled back)

``Pretraining`` is in ``pretraining.py``; ``SupervisedFinetuning`` and ``PreferenceOptimization``
are in ``finetune.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from gptforge.config.schema import Config
from gptforge.model.gpt import GPT
from gptforge.runtime.distributed import DistInfo
from gptforge.train.objectives import Objective

WeightsFilter = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class Stage(Protocol):
    name: str
    """The command that runs the stage (``train``, ``sft``, ``dpo``), for messages such as how
    to resume."""

    def setup(self, cfg: Config, dist_info: DistInfo) -> tuple[Config, Path, dict]:
        """Prepare what the run needs; return (the config completed, e.g. with the model taken
        from a checkpoint, the tokenizer directory, the tokenizer's info for model.json)."""

    def init_weights(self, cfg: Config, model: GPT) -> None:
        """Put the initial weights into the freshly built ``model`` (or keep the random ones)."""

    def init_optimizer(self, cfg: Config, model: GPT, optimizer) -> None:
        """Put a starting state into the fresh optimizer of a new run (``train.init_optimizer``
        carries the ``init_from`` checkpoint's over), or leave it fresh."""

    def build_objective(self, cfg: Config, model: GPT) -> Objective:
        """The objective, once the initial weights are in place (it may add LoRA adapters to
        ``model`` or copy it as a frozen reference)."""

    def loaders(self, cfg: Config, dist_info: DistInfo, run_dir: Path) -> tuple[object, object]:
        """(train loader, val loader or None), each with ``next_batches(micro_batches)`` (one
        step's micro-batches of this rank), ``next_batch``, ``reset``, a ``state_dict`` for
        exact resume, and ``depends_on_model`` (True if the model generates the batches, as RL
        rollouts: then the next step's are not drawn ahead)."""

    def checkpoint_extras(self, cfg: Config, model: GPT) -> tuple[WeightsFilter | None, dict]:
        """(a filter of the weights to save, or None for all; extra ``model.json`` entries)."""

    def load_run_weights(self, model: GPT, ckpt: Path) -> None:
        """Load what this stage's own checkpoints saved (resume and rollback)."""
