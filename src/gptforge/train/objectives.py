"""Objectives: what a training step minimises, given a model and a batch.

The training loop is the same for pretraining and later stages; what differs is the batch and the
objective: :class:`LanguageModeling` (pretraining), :class:`MaskedLanguageModeling` (SFT: only
the assistant's tokens count), :class:`DirectPreference` (DPO on preference pairs) and
:class:`GroupRelativePolicy` (GRPO on sampled answers scored by a reward). An
objective is a callable ``(model, batch) -> (loss, n_tokens)``: the mean loss over the tokens that
count, and how many tokens those were. ``batch`` is the tuple of tensors the stage's loader yields
(``(x, y)`` for language modelling). An objective may also keep a dict of floats in
``self.metrics`` describing its last call (e.g. DPO's reward margin); the loop averages them over
the micro-batches of a step and logs them next to the loss (``val_``-prefixed when evaluating).

``loss_terms(batch)`` says, before any forward pass, how many terms the loss of ``batch``
averages: tokens for language modelling, counted (assistant) tokens for SFT, pairs for DPO. The
loop weighs each micro-batch by it, so that a step's loss is the mean over all its terms, on all
ranks: the same as one big batch. Averaging micro-batch means instead would give a token in a
micro-batch with few assistant tokens more weight than one in a full micro-batch, so the result
would change with the micro-batch size and the number of processes.

A mixture-of-experts model also has auxiliary router losses (``GPT.aux_loss()``). They are added
so that they contribute their gradient but not their value: the returned loss (which the loop
backpropagates, logs and checks for NaN) reads as the plain next-token loss, comparable between
dense and MoE models and with the validation loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gptforge.model.loss import IGNORE_INDEX, target_log_probs, token_cross_entropy


class Objective:
    """What every objective offers the loop (subclasses override ``__call__`` and
    ``loss_terms``, and the attributes where they differ)."""

    name = "objective"
    inputs_per_batch = 1
    """Rows through the model per batch row (DPO runs a chosen and a rejected row)."""
    reference: nn.Module | None = None
    """A frozen model run beside the trained one (DPO), counted in the FLOPs per token."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}  # extra figures of the last call, logged per step

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, ...]):
        """(mean loss over the terms that count, number of tokens that count)."""
        raise NotImplementedError

    def loss_terms(self, batch: tuple[torch.Tensor, ...]) -> int:
        """How many terms the loss of ``batch`` averages, known before the forward pass."""
        raise NotImplementedError


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` and DDP wrappers (in either order)."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, DistributedDataParallel):
            model = model.module
        else:
            return model


def with_aux_gradient(loss: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
    """``loss`` in value, ``loss + aux`` in gradient (``aux - aux.detach()`` is exactly 0)."""
    if aux is None:
        return loss
    return loss + (aux - aux.detach())


class LanguageModeling(Objective):
    """Next-token prediction on every position (pretraining)."""

    name = "lm"

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
        x, y = batch
        logits = model(x)
        loss = token_cross_entropy(logits, y)
        aux_loss = getattr(unwrap_model(model), "aux_loss", None)  # MoE router losses
        if aux_loss is not None:
            loss = with_aux_gradient(loss, aux_loss())
        return loss, y.numel()

    def loss_terms(self, batch: tuple[torch.Tensor, ...]) -> int:
        return batch[1].numel()


def aux_loss_of(model: nn.Module) -> torch.Tensor | None:
    """The MoE router losses of ``model``'s last forward (None for a dense model)."""
    aux_loss = getattr(unwrap_model(model), "aux_loss", None)
    return aux_loss() if aux_loss is not None else None


def logits_of(model: nn.Module, x: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """Logits of ``x``; ``segment_ids`` (packed rows) is passed only when there is one, so models
    without packing support still work on padded batches."""
    return model(x) if segment_ids is None else model(x, segment_ids=segment_ids)


class MaskedLanguageModeling(Objective):
    """Next-token prediction on the targets that are not IGNORE_INDEX (supervised fine-tuning).

    The batch is ``(x, y)`` or, from a packing loader, ``(x, y, segment_ids)``. The loss is the
    mean over the counted targets (the assistant's tokens), and ``n_tokens`` their number. A batch
    with no counted target gives a loss of 0 with no gradient rather than NaN.
    """

    name = "sft"

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, ...]):
        x, y, *rest = batch
        logits = logits_of(model, x, rest[0] if rest else None)
        n_tokens = (y != IGNORE_INDEX).sum()
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum") / n_tokens.clamp(min=1)
        loss = with_aux_gradient(loss, aux_loss_of(model))
        return loss, int(n_tokens)

    def loss_terms(self, batch: tuple[torch.Tensor, ...]) -> int:
        return int((batch[1] != IGNORE_INDEX).sum())


class DirectPreference(Objective):
    """Direct Preference Optimization (Rafailov et al., 2023, https://arxiv.org/abs/2305.18290).

    For each pair the policy's log-probability of the chosen and the rejected answer is compared
    with a frozen reference model's (usually the SFT model it starts from). With the implicit
    reward ``r = beta * (log pi(answer) - log ref(answer))`` the loss is
    ``-log sigmoid(r_chosen - r_rejected)``: it raises the chosen answer relative to the rejected
    one, and ``beta`` sets how far the policy may drift from the reference (smaller = further).
    It equals ln 2 while the policy is the reference. ``sft_weight > 0`` adds the chosen answers'
    per-token NLL, which keeps their absolute probability from sinking (as in RPO, Pang et al.,
    2024, https://arxiv.org/abs/2404.19733).

    The batch is ``(chosen_x, chosen_y, rejected_x, rejected_y)``; both halves go through the
    model in one forward of 2B rows. ``self.metrics`` holds the mean rewards, their margin and
    the fraction of pairs where the chosen reward is the higher (``reward_accuracy``).
    """

    name = "dpo"
    inputs_per_batch = 2  # chosen and rejected rows both go through the model

    def __init__(self, reference: nn.Module, beta: float = 0.1, sft_weight: float = 0.0):
        if beta <= 0:
            raise ValueError(f"DPO beta must be positive, got {beta}")
        if sft_weight < 0:
            raise ValueError(f"DPO sft_weight must be >= 0, got {sft_weight}")
        super().__init__()
        self.reference = reference.eval().requires_grad_(False)
        self.beta, self.sft_weight = beta, sft_weight

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, ...]):
        chosen_x, chosen_y, rejected_x, rejected_y = batch
        B = chosen_x.size(0)
        x = torch.cat([chosen_x, rejected_x])  # (2B, T)
        y = torch.cat([chosen_y, rejected_y])
        token_logp = target_log_probs(model(x), y)  # (2B, T)
        aux = aux_loss_of(model)
        with torch.no_grad():
            ref_logp = target_log_probs(self.reference(x), y).sum(dim=1)  # (2B,)
            aux_loss_of(self.reference)  # clears the reference's MoE losses, if any
        logp = token_logp.sum(dim=1)  # (2B,) log-probability of each answer
        rewards = self.beta * (logp - ref_logp).detach()
        margin_logits = self.beta * ((logp[:B] - ref_logp[:B]) - (logp[B:] - ref_logp[B:]))
        loss = -F.logsigmoid(margin_logits).mean()
        if self.sft_weight > 0:
            n_chosen = (chosen_y != IGNORE_INDEX).sum().clamp(min=1)
            loss = loss + self.sft_weight * (-token_logp[:B].sum() / n_chosen)
        margin = rewards[:B] - rewards[B:]
        self.metrics = {"reward_margin": float(margin.mean()),
                        "reward_accuracy": float((margin > 0).float().mean()),
                        "chosen_reward": float(rewards[:B].mean()),
                        "rejected_reward": float(rewards[B:].mean())}
        return with_aux_gradient(loss, aux), int((y != IGNORE_INDEX).sum())

    def loss_terms(self, batch: tuple[torch.Tensor, ...]) -> int:
        return batch[0].size(0)  # the loss is a mean over pairs


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages: each reward minus its group's mean, divided by the group's standard
    deviation (+ ``eps``). ``rewards`` (N * G,) holds the G answers to each prompt in a row; the
    standard deviation is the sample one (n - 1), as TRL's GRPOTrainer computes it. A group whose
    answers all scored alike gets advantages of 0: it says nothing about which answer is better."""
    groups = rewards.float().view(-1, group_size)  # (N, G)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True)
    return ((groups - mean) / (std + eps)).flatten()


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        clip_eps: float) -> torch.Tensor:
    """PPO's clipped surrogate per token (Schulman et al. 2017, https://arxiv.org/abs/1707.06347),
    negated to be minimised: ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)`` with
    ``ratio = exp(logp - old_logp)``. Shapes (B, T), ``advantages`` broadcast from (B, 1)."""
    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    return -torch.minimum(ratio * advantages, clipped * advantages)


def k3_kl(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """The per-token KL estimate GRPO uses (Schulman's "k3", http://joschu.net/blog/kl-approx.html):
    ``exp(ref - new) - (ref - new) - 1``, never negative, unbiased for KL(policy || reference)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


class GroupRelativePolicy(Objective):
    """Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath",
    https://arxiv.org/abs/2402.03300).

    For every prompt a group of answers is sampled and scored by a reward; an answer's advantage
    is its reward relative to the group (:func:`group_advantages`), so no value model is needed.
    Every token of an answer carries its advantage in PPO's clipped objective
    (:func:`clipped_policy_loss`), optionally plus ``kl_coef`` times the k3 KL estimate to a
    frozen ``reference`` (:func:`k3_kl`). The loss is the mean over all answer tokens of the
    batch (a token-level mean, as in DAPO, Yu et al. 2025: long answers are not down-weighted).

    The batch is ``(x, y, advantages, old_logp, rewards, failed)``: ``y`` is IGNORE_INDEX except
    on answer tokens; ``advantages``, ``rewards`` and ``failed`` (1 = the reward function failed)
    are per row; ``old_logp`` (B, T) is the sampling policy's log-probability of each target.
    With one optimisation pass per batch the ratio is 1, and the gradient is that of
    ``-A * logp``. ``self.metrics`` holds reward, advantage, length, clipping and KL figures.
    """

    name = "grpo"

    def __init__(self, reference: nn.Module | None = None, clip_eps: float = 0.2,
                 kl_coef: float = 0.0):
        if not 0 < clip_eps < 1:
            raise ValueError(f"GRPO clip_eps must be in (0, 1), got {clip_eps}")
        if kl_coef < 0 or (kl_coef > 0 and reference is None):
            raise ValueError("GRPO kl_coef must be >= 0, and > 0 only with a reference model")
        super().__init__()
        self.reference = reference.eval().requires_grad_(False) if reference is not None else None
        self.clip_eps, self.kl_coef = clip_eps, kl_coef

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, ...]):
        x, y, advantages, old_logp, rewards, failed = batch
        mask = (y != IGNORE_INDEX).float()  # (B, T) answer tokens
        n_tokens = mask.sum().clamp(min=1)
        logp = target_log_probs(model(x), y)  # (B, T)
        aux = aux_loss_of(model)
        per_token = clipped_policy_loss(logp, old_logp.float(), advantages.float()[:, None],
                                        self.clip_eps)
        metrics = {}
        if self.reference is not None:
            with torch.no_grad():
                ref_logp = target_log_probs(self.reference(x), y)
                aux_loss_of(self.reference)  # clears the reference's MoE losses, if any
            kl = k3_kl(ref_logp, logp)
            per_token = per_token + self.kl_coef * kl
            metrics["kl"] = float((kl.detach() * mask).sum() / n_tokens)
        loss = (per_token * mask).sum() / n_tokens
        self.metrics = {**self._rollout_metrics(logp.detach(), old_logp, mask, batch), **metrics}
        return with_aux_gradient(loss, aux), int(mask.sum())

    def _rollout_metrics(self, logp, old_logp, mask, batch) -> dict[str, float]:
        _, _, advantages, _, rewards, failed = batch
        ratio = torch.exp(logp - old_logp.float())
        clipped = ((ratio - 1).abs() > self.clip_eps).float()
        return {"reward_mean": float(rewards.float().mean()),
                "reward_std": float(rewards.float().std()) if rewards.numel() > 1 else 0.0,
                "advantage_abs": float(advantages.float().abs().mean()),
                "completion_len": float(mask.sum(dim=1).mean()),
                "clip_fraction": float((clipped * mask).sum() / mask.sum().clamp(min=1)),
                "failed_rollouts": float(failed.float().sum())}

    def loss_terms(self, batch: tuple[torch.Tensor, ...]) -> int:
        return int((batch[1] != IGNORE_INDEX).sum())  # the loss is a mean over answer tokens
