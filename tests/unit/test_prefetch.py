"""Trainer.prefetch: drawing the next step's batches one step ahead (on by default on CUDA) must
not change what is trained, nor what a checkpoint records: losses equal to drawing each step's
batches when it starts, and a run resumed from a checkpoint taken with a batch prefetched
continues exactly."""

from __future__ import annotations

import numpy as np
import torch

from gptforge.checkpoints.checkpointer import Checkpointer
from gptforge.config.schema import Config, OptimConfig, RuntimeConfig, TrainConfig
from gptforge.data.loader import BatchLoader
from gptforge.model.config import ModelConfig
from gptforge.model.gpt import GPT
from gptforge.runtime.device import resolve_precision
from gptforge.train.loop import Trainer, TrainingParts
from gptforge.train.objectives import LanguageModeling
from gptforge.train.optim import build_optimizer
from gptforge.train.pretraining import Pretraining

TOKENS = np.random.default_rng(0).integers(0, 50, size=20_000).astype(np.uint16)


def make_trainer(run_dir, prefetch: bool) -> Trainer:
    torch.manual_seed(0)
    model_cfg = ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, block_size=16)
    cfg = Config(model=model_cfg, train=TrainConfig(batch_size=4, grad_accum=2, max_steps=12),
                 optim=OptimConfig(lr=3e-3, grad_clip=0.5), runtime=RuntimeConfig(device="cpu"))
    precision = resolve_precision(torch.device("cpu"), "float32")
    model = GPT(model_cfg)
    parts = TrainingParts(model=model, train_model=model,
                          optimizer=build_optimizer(model, cfg.optim, precision.device),
                          objective=LanguageModeling(),
                          train_loader=BatchLoader([TOKENS], 16, 4, seed=0), val_loader=None,
                          precision=precision)
    tokenizer_dir = run_dir.parent / "tokenizer"
    tokenizer_dir.mkdir(exist_ok=True)
    trainer = Trainer(cfg, Pretraining(), parts,
                      Checkpointer(run_dir, tokenizer_dir=tokenizer_dir, tokenizer_info={}))
    trainer.prefetch = prefetch
    trainer.model.train()
    return trainer


def losses(trainer: Trainer, steps: int) -> list[float]:
    return [trainer.train_step()[0] for _ in range(steps)]


def test_prefetching_trains_the_same_and_resumes_exactly(tmp_path):
    plain = losses(make_trainer(tmp_path / "plain", prefetch=False), 12)

    ahead = make_trainer(tmp_path / "ahead", prefetch=True)
    first = losses(ahead, 5)
    assert ahead._prefetched is not None  # step 6's batches are already drawn
    ahead.save()
    assert first + losses(ahead, 7) == plain

    resumed = make_trainer(tmp_path / "resumed", prefetch=True)
    resumed.restore(ahead.checkpointer.latest())
    assert first + losses(resumed, 7) == plain


def test_rl_rollouts_are_never_drawn_ahead():
    from gptforge.train.rollouts import RolloutLoader

    assert RolloutLoader.depends_on_model and not BatchLoader.depends_on_model
