"""Rollouts for GRPO: the batches of reinforcement learning, sampled from the policy being trained.

Pretraining and fine-tuning read their batches from files; reinforcement learning makes them.
Each batch takes the next ``batch_size`` prompts (a seeded epoch order, as every loader here),
samples ``group_size`` answers to each with the current weights (the inference engine, one batch
of G rows per prompt, under ``inference_mode``), scores every answer with the reward
(``rewards.py``), turns the rewards into group-normalised advantages and records the sampling
policy's log-probability of every answer token, the ``old_logp`` of PPO's ratio.

With ``ppo_epochs > 1`` a round of rollouts (one optimizer step's ``grad_accum`` batches) is
served that many times before new answers are sampled, so the ratio moves away from 1.

Resume is exact: the state holds the prompt order's position, the generator that seeds every
sampling call, and the rollouts of a round not yet fully served.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from gptforge.data.loader import EpochOrder, OrderedLoader, micro_slices
from gptforge.inference.engine import Engine, SamplingSettings
from gptforge.model.loss import IGNORE_INDEX, target_log_probs
from gptforge.train.objectives import group_advantages
from gptforge.train.rewards import RewardFn, score

log = logging.getLogger(__name__)
FAILURES_SHOWN = 5  # reward failures logged one by one; the rest are only counted


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    """The prompt's token ids (chat-rendered, ending in ``<|assistant|>``, or plain text)."""
    source: object
    """The prompt as the record gives it (a string or a message list), for the reward."""
    example: dict = field(default_factory=dict)
    """The whole record, for the reward."""


@dataclass(frozen=True)
class RolloutSettings:
    group_size: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    ppo_epochs: int = 1
    advantage_eps: float = 1e-4
    stop_ids: tuple[int, ...] = ()
    banned_ids: tuple[int, ...] = ()


class RolloutLoader(OrderedLoader):
    """``next_batch() -> (x, y, advantages, old_logp, rewards, failed)`` sampled from ``model``
    (the bare model the loop trains, so every batch sees the current weights)."""

    depends_on_model = True  # a round is sampled with the weights of the step it starts

    def __init__(self, model: torch.nn.Module, tokenizer, prompts: Sequence[Prompt],
                 reward: RewardFn, settings: RolloutSettings, *, batch_size: int,
                 grad_accum: int = 1, seed: int = 0, rank: int = 0, world_size: int = 1,
                 autocast=contextlib.nullcontext):
        self.model, self.tokenizer, self.prompts = model, tokenizer, list(prompts)
        self.reward, self.settings = reward, settings
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.rank, self.world_size, self.autocast = rank, world_size, autocast
        self.order = EpochOrder(len(self.prompts), seed)
        # Seeds every sampling call; its state is saved, so a resumed run samples the same.
        self.generator = torch.Generator().manual_seed(seed * 7919 + rank)
        self.round: list[tuple[torch.Tensor, ...]] = []
        self.served = 0
        self.failures = 0

    @property
    def windows_per_epoch(self) -> int:
        return len(self.prompts)

    # ---- batches ---------------------------------------------------------------------------
    def next_batches(self, micro_batches: int) -> list[tuple[torch.Tensor, ...]]:
        """One step's micro-batches: rollouts are sampled a round at a time (see next_batch)."""
        return [self.next_batch() for _ in range(micro_batches)]

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        if self.served >= len(self.round) * self.settings.ppo_epochs:
            self.round = [self.rollout_batch() for _ in range(self.grad_accum)]
            self.served = 0
        batch = self.round[self.served % len(self.round)]
        self.served += 1
        return batch

    def _my_items(self) -> list[int]:
        """This rank's prompts of the next global batch (the same slice whatever the layout)."""
        items = self.order.take(self.batch_size * self.world_size)
        return micro_slices(items, self.batch_size, self.rank, self.world_size)[0]

    def rollout_batch(self) -> tuple[torch.Tensor, ...]:
        """Sample, score and measure one batch of ``batch_size`` prompts x ``group_size``."""
        rows, rewards, failed = [], [], []
        with _eval_mode(self.model):
            engine = Engine(self.model, vocab_size=self.tokenizer.vocab_size)
            for index in self._my_items():
                prompt = self.prompts[index]
                for answer in self.sample(engine, prompt.ids):
                    value, error = score(self.reward, prompt.source, self._text(answer),
                                         prompt.example)
                    rows.append((prompt.ids, answer))
                    rewards.append(value)
                    failed.append(error is not None)
                    if error is not None:
                        self._report_failure(error)
            rewards_t = torch.tensor(rewards, dtype=torch.float32)
            advantages = group_advantages(rewards_t, self.settings.group_size,
                                          self.settings.advantage_eps)
            x, y = self._pad(rows)
            old_logp = self._log_probs(x, y)
        return x, y, advantages, old_logp, rewards_t, torch.tensor(failed, dtype=torch.float32)

    def sample(self, engine: Engine, prompt_ids: list[int]) -> list[list[int]]:
        """``group_size`` answers to one prompt, each ending with its stop id if it stopped."""
        s = self.settings
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        sampling = SamplingSettings(max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                    top_k=s.top_k, seed=seed)
        answers: list[list[int]] = [[] for _ in range(s.group_size)]
        done = [False] * s.group_size
        for step in engine.generate(prompt_ids, sampling, num_samples=s.group_size,
                                    stop_ids=s.stop_ids, banned_ids=s.banned_ids):
            for i, token in enumerate(step.tolist()):
                if not done[i]:
                    answers[i].append(token)
                    done[i] = token in s.stop_ids
        return answers

    def _text(self, answer: list[int]) -> str:
        ids = answer[:-1] if answer and answer[-1] in self.settings.stop_ids else answer
        return self.tokenizer.decode(ids)

    def _pad(self, rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (B, T) with T the longest row: targets only on answer tokens."""
        T = max(len(p) + len(a) for p, a in rows) - 1
        x = torch.full((len(rows), T), self.tokenizer.pad_id, dtype=torch.long)
        y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        for i, (prompt, answer) in enumerate(rows):
            ids = torch.tensor(prompt + answer, dtype=torch.long)
            x[i, :len(ids) - 1] = ids[:-1]
            y[i, len(prompt) - 1:len(ids) - 1] = ids[len(prompt):]
        return x, y

    @torch.no_grad()
    def _log_probs(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        with self.autocast():
            logits = self.model(x.to(device))
        return target_log_probs(logits, y.to(device)).cpu()

    def _report_failure(self, error: str) -> None:
        self.failures += 1
        if self.failures <= FAILURES_SHOWN:
            more = " (further failures are only counted: failed_rollouts in metrics.jsonl)" \
                if self.failures == FAILURES_SHOWN else ""
            log.warning("reward function failed on a rollout (reward 0): %s%s", error, more)

    # ---- resumable state -------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self.round, self.served = [], 0

    def state_dict(self) -> dict:
        unserved = self.served < len(self.round) * self.settings.ppo_epochs
        return {"order": self.order.state_dict(), "generator": self.generator.get_state(),
                "served": self.served, "round": [list(b) for b in self.round] if unserved else []}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state["order"])
        self.generator.set_state(state["generator"])
        self.round = [tuple(b) for b in state["round"]]
        self.served = int(state["served"]) if self.round else 0


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """``model`` in eval mode (the engine sets it) and back in its former mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
