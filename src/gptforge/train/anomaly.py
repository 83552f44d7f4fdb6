"""Spotting bad optimizer steps before they are taken: non-finite values and loss spikes.

Long runs meet the occasional batch that sends the loss to NaN/inf or far above its trend (a
corrupt document, an unlucky Adam state, too high a learning rate). Taking that step can ruin the
weights. The guard looks at each step's loss and gradient norm *before* the optimizer runs and
names the problem; the trainer then stops, skips the batch, or rolls back to the last checkpoint
with a lower learning rate (``train.on_anomaly``). A spike is a loss above
``spike_threshold`` x its exponential moving average; the average skips the first steps, where the
loss falls fast, and only includes accepted steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

WARMUP_STEPS = 20  # steps before spikes are judged: the loss falls too fast early on
EMA_DECAY = 0.95


class Anomaly(Exception):
    """A step that should not be taken; ``reason`` is a short human description."""

    def __init__(self, reason: str, loss: float):
        super().__init__(reason)
        self.reason, self.loss = reason, loss


@dataclass
class AnomalyGuard:
    spike_threshold: float = 0.0  # 0 = spikes are not checked
    check_grad_norm: bool = True  # off under fp16 loss scaling, where inf gradients are routine
    loss_ema: float | None = None
    accepted: int = 0

    def check(self, loss: float, grad_norm: float) -> None:
        """Raise :class:`Anomaly` if this step's loss or gradient norm is bad."""
        if not math.isfinite(loss):
            raise Anomaly(f"loss became {loss}", loss)
        if self.check_grad_norm and not math.isfinite(grad_norm):
            raise Anomaly(f"gradient norm became {grad_norm}", loss)
        if (self.spike_threshold > 0 and self.accepted >= WARMUP_STEPS
                and loss > self.spike_threshold * self.loss_ema):
            raise Anomaly(f"loss spiked to {loss:.4f} (running average {self.loss_ema:.4f})",
                          loss)

    def accept(self, loss: float) -> None:
        self.accepted += 1
        self.loss_ema = loss if self.loss_ema is None else \
            EMA_DECAY * self.loss_ema + (1 - EMA_DECAY) * loss

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.loss_ema, self.accepted = state["loss_ema"], state["accepted"]
