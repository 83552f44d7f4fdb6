"""The training loop shared by every stage (pretraining now; SFT and DPO plug in objectives).

One optimizer step = ``grad_accum`` micro-batches forward and backward (gradients summed, each
micro-batch's mean loss weighted by its share of the step's loss terms, so the sum is the mean
over every term of the step, on every rank), gradient clipping, the learning rate for this step,
the optimizer update. Around it: logging, evaluation, checkpoints, early stopping, and
clean stops on SIGINT/SIGTERM or a non-finite loss.

Everything that must survive a crash is saved in each checkpoint: the weights, and in
``state_dict()`` step, tokens seen, best val loss, optimizer, data loader position and RNG states.
Restoring them (``restore``) continues the run exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gptforge.checkpoints.checkpointer import Checkpointer
from gptforge.config.schema import Config
from gptforge.errors import GptforgeError
from gptforge.metrics.sinks import MetricsWriter, NullWriter, truncate_after
from gptforge.runtime import distributed
from gptforge.runtime.distributed import DistInfo
from gptforge.train.anomaly import Anomaly, AnomalyGuard
from gptforge.train.evaluate import evaluate
from gptforge.train.objectives import Objective
from gptforge.train.schedule import grad_accum_at, lr_at, weight_decay_factor
from gptforge.train.stage import Stage

log = logging.getLogger(__name__)


@dataclass
class TrainingParts:
    """What a stage's run is made of, assembled by ``launch.py`` before the loop starts."""

    model: torch.nn.Module
    """The model with the plain parameter names checkpoints use (under FSDP2 it is itself
    sharded, in place)."""
    train_model: torch.nn.Module
    """What runs: ``model``, or it DDP-wrapped and/or compiled."""
    optimizer: torch.optim.Optimizer
    objective: Objective
    train_loader: object
    val_loader: object | None
    precision: object
    """Device, dtype and autocast (``runtime.device.Precision``)."""
    dist: DistInfo = DistInfo()
    flops_per_token: int = 0
    """Training FLOPs per token, for MFU (0 = don't report MFU)."""
    peak_flops: float = 0.0
    """Peak FLOP/s of one device in the compute dtype."""
    sampler: Callable[[int], str] | None = None
    """step -> a text sample from the model being trained (None = no samples)."""


@dataclass
class LoopState:
    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float | None = None
    evals_since_best: int = 0
    last_val_loss: float | None = None
    last_eval_step: int = -1
    lr_scale: float = 1.0  # lowered by each rollback
    anomalies: int = 0
    elapsed: float = 0.0  # wall-clock seconds of training, all sessions of the run together


def _grad_scaler(model: torch.nn.Module, precision):
    """The loss scaler of float16 training (disabled otherwise). Under FSDP2 each rank holds a
    shard of the gradients, so the check for inf/NaN must be agreed on by all ranks: the sharded
    scaler all-reduces it, and every rank skips (or takes) the step together."""
    enabled = precision.needs_grad_scaler
    if enabled and distributed.is_sharded(model):
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(precision.device.type, enabled=True)
    return torch.amp.GradScaler(precision.device.type, enabled=enabled)


def leave_out_of_eta(bar, seconds: float) -> None:
    """Shift a tqdm bar's clock by ``seconds`` of evaluation or saving, so that its rate and time
    left describe training steps only (otherwise the ETA jumps after every evaluation)."""
    bar.start_t += seconds
    bar.last_print_t += seconds


class Trainer:
    """Runs a stage's training: ``fit()`` to ``train.max_steps``, saving through the
    checkpointer; ``restore(ckpt)`` first to continue a run."""

    def __init__(self, cfg: Config, stage: Stage, parts: TrainingParts,
                 checkpointer: Checkpointer):
        self.cfg, self.stage, self.checkpointer = cfg, stage, checkpointer
        self.run_dir = checkpointer.run_dir
        self.dist = parts.dist
        self.model, self.train_model = parts.model, parts.train_model
        self._parameters = list(self.model.parameters())  # walking the modules costs per step
        self.optimizer, self.objective = parts.optimizer, parts.objective
        self.train_loader, self.val_loader = parts.train_loader, parts.val_loader
        self.precision = parts.precision
        self.flops_per_token, self.peak_flops = parts.flops_per_token, parts.peak_flops
        self.sampler = parts.sampler
        self.scaler = _grad_scaler(self.model, self.precision)
        for group in self.optimizer.param_groups:  # the base the weight-decay schedule scales
            group.setdefault("initial_weight_decay", group["weight_decay"])
        self.state = LoopState()
        self.guard = AnomalyGuard(spike_threshold=cfg.train.spike_threshold,
                                  check_grad_norm=not self.precision.needs_grad_scaler)
        # On CUDA the next step's batches are drawn, pinned and copied while the GPU computes
        # this one; not for batches the model itself generates (RL rollouts need the weights
        # after this step's update), and not on CPU, where drawing would only take cores from
        # the step.
        self.prefetch = self.precision.device.type == "cuda" and \
            not self.train_loader.depends_on_model
        self._prefetched: tuple[int, list[tuple], list[int]] | None = None
        self._loader_state: dict = {}
        self.stop_signal: int | None = None
        self.last_metrics: dict[str, float] = {}  # the objective's extra figures, last step

    # ---- resumable state -------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything but the weights and the optimizer (which the checkpointer saves), in a
        form any world size can load (a collective: the RNG states of every rank)."""
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"loop": asdict(self.state), "guard": self.guard.state_dict(),
                "scaler": self.scaler.state_dict(),
                "train_loader": (self._loader_state if self._prefetched is not None
                                 else self.train_loader.state_dict()),
                "rng": distributed.gather_objects(rng, self.dist)}

    def load_state_dict(self, state: dict) -> None:
        self.state = LoopState(**state["loop"])
        self.guard.load_state_dict(state["guard"])
        self.scaler.load_state_dict(state["scaler"])
        self.train_loader.load_state_dict(state["train_loader"])
        self._prefetched = None  # drawn from the position just replaced
        ranks = state["rng"]
        if len(ranks) == self.dist.world_size:  # same world size: each rank continues its stream
            rng = ranks[self.dist.rank]
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        else:  # another world size: fresh, distinct, reproducible streams
            torch.manual_seed(self.cfg.train.seed + 7919 * self.state.step + self.dist.rank)

    def restore(self, ckpt: Path) -> None:
        """Continue from checkpoint ``ckpt``: weights, optimizer and the rest (on every rank)."""
        self.load_state_dict(self.checkpointer.restore(ckpt, self.model, self.optimizer))

    # ---- one optimizer step ----------------------------------------------------------
    def train_step(self) -> tuple[float, float]:
        """Run one optimizer step; return (mean loss, gradient norm before clipping)."""
        tc, oc = self.cfg.train, self.cfg.optim
        total = torch.zeros((), device=self.precision.device)
        accum = grad_accum_at(self.state.step, tc.grad_accum, self.cfg.schedule)
        metrics: dict[str, float] = {}
        # The loss terms (e.g. assistant tokens) of every micro-batch on every rank, counted
        # first: each micro-batch's mean loss then weighs n_i / terms, and the data-parallel
        # gradient average (which divides by the world size) is undone by the factor world_size.
        batches, counts = self._next_batches(accum)
        terms = max(1, distributed.sum_over_ranks(sum(counts), self.dist, self.precision.device))
        for micro, (batch, n) in enumerate(zip(batches, counts)):
            weight = n * self.world_size / terms
            with distributed.gradient_sync(self.train_model, micro == accum - 1):
                with self.precision.autocast():
                    loss, _ = self.objective(self.train_model, batch)
                self.scaler.scale(loss * weight).backward()
            total += loss.detach() * weight
            for key, value in self.objective.metrics.items():
                metrics[key] = metrics.get(key, 0.0) + float(value) / accum
        if self.prefetch and self.state.step + 1 < tc.max_steps:
            self._prefetch_next()  # the CPU draws while the GPU still computes this step
        self.scaler.unscale_(self.optimizer)
        # The gradient norm now, the clipping after the step's one host sync below: below the
        # limit, clip_grad_norm_ would multiply every gradient by exactly 1.0 (~5% of a small
        # model's CPU step for nothing); above it, the same scaling is applied.
        norm = torch.nn.utils.get_total_norm(
            [p.grad for p in self._parameters if p.grad is not None])
        grad_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2
        # Every rank sees the same loss and norm, so all of them take the same decision. The one
        # host sync of the step (both read at once): the guard must see a NaN before the
        # optimizer touches the weights. On CPU it costs nothing; on CUDA the GPU idles only
        # while the optimizer's few fused kernels are launched.
        loss_and_norm = torch.stack([distributed.all_reduce_mean(total, self.dist),
                                     grad_norm.to(total.device, torch.float32)])
        mean_loss, grad_norm = loss_and_norm.tolist()
        self.guard.check(mean_loss, grad_norm)  # raises Anomaly before any harm is done
        self.guard.accept(mean_loss)
        if oc.grad_clip > 0 and grad_norm > oc.grad_clip:  # every rank sees the same norm
            torch.nn.utils.clip_grads_with_norm_(self._parameters, oc.grad_clip, norm)
        self._set_hyperparameters()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        # Tokens through the model: DPO batches hold two inputs (chosen and rejected rows).
        inputs = self.objective.inputs_per_batch
        self.state.tokens_seen += accum * inputs * batch[0].numel() * self.world_size
        self.last_metrics = metrics
        return mean_loss, grad_norm

    def _to_device(self, batch: tuple) -> tuple:
        """The batch on the training device. On CUDA it goes through pinned memory with a
        non-blocking copy, so the copies of a step's micro-batches run while the GPU computes."""
        device = self.precision.device
        if device.type != "cuda":
            return tuple(t.to(device) for t in batch)
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)

    def _next_batches(self, accum: int) -> tuple[list[tuple], list[int]]:
        """This rank's micro-batches of the step's global batch, on the device, and the loss
        terms of each. The loader draws the global batch at once, so the data order does not
        depend on how it is split over processes and micro-batches (``data/loader.py``)."""
        if self._prefetched is not None:
            drawn_for, batches, counts = self._prefetched
            self._prefetched = None
            if drawn_for == accum:
                return batches, counts
            raise RuntimeError("prefetched batches were drawn for another accumulation")
        batches = self.train_loader.next_batches(accum)
        counts = [self.objective.loss_terms(b) for b in batches]  # before the copy: no sync
        return [self._to_device(b) for b in batches], counts  # on CUDA the copies overlap compute

    def _prefetch_next(self) -> None:
        """Draw the next step's batches now, one step ahead. Checkpoints keep recording the data
        position of the steps taken (the loader's state before this draw), so resuming is exact:
        the prefetched batches are drawn again."""
        accum = grad_accum_at(self.state.step + 1, self.cfg.train.grad_accum, self.cfg.schedule)
        self._loader_state = self.train_loader.state_dict()
        self._prefetched = (accum, *self._next_batches(accum))

    def _set_hyperparameters(self) -> None:
        """Learning rate and weight decay of every parameter group for the coming step."""
        tc, oc, sc = self.cfg.train, self.cfg.optim, self.cfg.schedule
        lr = lr_at(self.state.step, oc.lr, tc.max_steps, sc) * self.state.lr_scale
        wd = weight_decay_factor(self.state.step, tc.max_steps, lr / oc.lr if oc.lr else 0.0, sc)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = group["initial_weight_decay"] * wd

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    # ---- anomalies ----------------------------------------------------------------------
    def _handle_anomaly(self, anomaly: Anomaly, writer) -> None:
        """Stop, skip the batch, or roll back, as ``train.on_anomaly`` says."""
        tc = self.cfg.train
        writer.flush()  # a rollback rewrites metrics.jsonl: nothing may still be on its way
        self.optimizer.zero_grad(set_to_none=True)
        self.state.anomalies += 1
        step = self.state.step + 1
        last = self.checkpointer.latest()
        policy = tc.on_anomaly
        if policy == "rollback" and last is None:
            policy = "stop"
        if policy == "stop" or self.state.anomalies > tc.max_anomalies:
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
            raise GptforgeError(
                f"{anomaly.reason} at step {step}; training stopped and {where}. Lower optim.lr, "
                "raise schedule.warmup_steps, set optim.grad_clip or train.on_anomaly=rollback")
        if policy == "skip":
            self.state.step += 1  # the batch was consumed; the schedule moves on without it
        else:
            self._roll_back(last)
            writer.reopen()  # metrics.jsonl was rewritten without the undone steps
        event = {"step": step, "event": policy, "reason": anomaly.reason,
                 "lr_scale": self.state.lr_scale}
        if policy == "rollback":
            event["to_step"] = self.state.step
        log.warning("step %d: %s; %s", step, anomaly.reason,
                    "skipping the batch" if policy == "skip" else
                    f"rolled back to {last.name}, learning rate x{self.state.lr_scale:g}")
        writer.log(event)

    def _roll_back(self, ckpt: Path) -> None:
        """Restore the last checkpoint (weights, optimizer, data, RNG) with a lower lr scale."""
        anomalies, lr_scale, elapsed = self.state.anomalies, self.state.lr_scale, \
            self.state.elapsed
        self.restore(ckpt)
        self.state.elapsed = elapsed  # the time was spent all the same
        self.state.anomalies = anomalies
        self.state.lr_scale = lr_scale * self.cfg.train.rollback_lr_scale
        if self.dist.is_main:
            truncate_after(self.run_dir / "metrics.jsonl", self.state.step)

    # ---- the loop ----------------------------------------------------------------------
    def fit(self) -> int:
        """Train to ``train.max_steps``; return an exit code (0, or 128+signal if stopped)."""
        tc = self.cfg.train
        writer = (MetricsWriter(self.run_dir, tensorboard=self.cfg.runtime.tensorboard,
                                wandb_project=self.cfg.runtime.wandb_project,
                                config=dataclasses.asdict(self.cfg))
                  if self.dist.is_main else NullWriter())
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = self._progress_bar()
        self._start_step, self._start_time = self.state.step, time.perf_counter()
        self._elapsed_before = self.state.elapsed  # earlier sessions of a resumed run
        self._last_status = time.perf_counter()
        self._paused = 0.0  # seconds of evaluation and saving, left out of speeds and ETAs
        try:
            if self.state.step == 0:
                paused = time.perf_counter()
                self._evaluate(writer)
                self._pause_ended(bar, paused)
            window_t0, window_tokens = time.perf_counter(), self.state.tokens_seen
            while self.state.step < tc.max_steps:
                try:
                    loss, grad_norm = self.train_step()
                except Anomaly as anomaly:
                    self._handle_anomaly(anomaly, writer)
                    continue
                step = self.state.step
                self.state.elapsed = self._elapsed_before + time.perf_counter() - self._start_time
                if step % tc.log_interval == 0 or step == tc.max_steps:
                    elapsed = time.perf_counter() - window_t0
                    tok_s = (self.state.tokens_seen - window_tokens) / max(elapsed, 1e-9)
                    self._log_train(writer, bar, loss, grad_norm, tok_s)
                    window_t0, window_tokens = time.perf_counter(), self.state.tokens_seen
                if bar is not None:
                    bar.update(1)
                stop_early = False
                paused = time.perf_counter()  # evaluation and saving are not training time
                if step % tc.eval_interval == 0 or step == tc.max_steps:
                    stop_early = self._evaluate(writer)
                self._agree_on_stop()
                if step % tc.ckpt_interval == 0 or step == tc.max_steps or stop_early \
                        or self.stop_signal is not None:
                    writer.flush()  # metrics.jsonl is complete up to the checkpoint's step
                    self.save()
                window_t0 += self._pause_ended(bar, paused)
                if self.stop_signal is not None:
                    log.info("stopped by signal %d at step %d; resume with "
                             "`gptforge %s --resume %s`", self.stop_signal, step, self.stage.name,
                             self.run_dir)
                    return 128 + self.stop_signal
                if stop_early:
                    log.info("early stop at step %d: val loss has not improved for %d evaluations",
                             step, tc.early_stop_patience)
                    break
            return 0
        finally:
            if bar is not None:
                bar.close()
            writer.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _agree_on_stop(self) -> None:
        """A signal may reach ranks at different steps: stop all of them at the same one."""
        if not self.dist.enabled:
            return
        # A small integer all-reduce, cheaper per step than gathering Python objects.
        signal_number = -distributed.min_over_ranks(-(self.stop_signal or 0), self.dist,
                                                    self.precision.device)
        self.stop_signal = signal_number or None

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None:  # a second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.stop_signal = signum
        log.info("signal %d received: saving a checkpoint after this step (again to abort)",
                 signum)

    def _progress_bar(self):
        if not (self.cfg.runtime.progress and sys.stderr.isatty() and self.dist.is_main):
            return None
        from tqdm import tqdm
        return tqdm(total=self.cfg.train.max_steps, initial=self.state.step, unit="step",
                    dynamic_ncols=True, file=sys.stderr)

    def _log_train(self, writer, bar, loss: float, grad_norm: float, tok_s: float) -> None:
        step = self.state.step
        # tok_s counts every rank's tokens, so the peak is every rank's too.
        peak = self.peak_flops * self.world_size
        mfu = self.flops_per_token * tok_s / peak if peak else 0.0
        lr = self.optimizer.param_groups[0]["lr"]
        writer.log({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                    "tokens_per_sec": tok_s, "mfu": mfu, "tokens": self.state.tokens_seen,
                    "elapsed_sec": round(self.state.elapsed, 3), **self.last_metrics})
        status = f"loss {loss:.4f}  {tok_s:,.0f} tok/s  mfu {mfu:.1%}"
        if bar is not None:
            bar.set_postfix_str(status)
        elif time.perf_counter() - self._last_status >= 10.0:  # no terminal: a line every 10 s
            self._last_status = time.perf_counter()
            left = int((self.cfg.train.max_steps - step) * self._seconds_per_step())
            log.info("step %d/%d  %s  eta %d:%02d:%02d", step, self.cfg.train.max_steps, status,
                     left // 3600, left % 3600 // 60, left % 60)

    def _seconds_per_step(self) -> float:
        done = self.state.step - self._start_step
        return (time.perf_counter() - self._start_time - self._paused) / max(1, done)

    def _pause_ended(self, bar, started: float) -> float:
        """Leave the pause since ``started`` out of the ETAs; return its length in seconds."""
        seconds = time.perf_counter() - started
        self._paused += seconds
        if bar is not None:
            leave_out_of_eta(bar, seconds)
        return seconds

    def _evaluate(self, writer) -> bool:
        """Evaluate, log, maybe print a sample; return True if early stopping should trigger."""
        tc = self.cfg.train
        if self.val_loader is None:
            self._sample(self.state.step)
            return False
        result = evaluate(self.train_model, self.val_loader, self.objective, self.precision,
                          tc.eval_steps, self.dist)
        step = self.state.step
        writer.log({"step": step, **result, "tokens": self.state.tokens_seen})
        self.state.last_val_loss, self.state.last_eval_step = result["val_loss"], step
        log.info("step %d: val loss %.4f (ppl %.2f)", step, result["val_loss"], result["val_ppl"])
        best = self.state.best_val_loss
        if best is None or result["val_loss"] < best:
            self.state.best_val_loss, self.state.evals_since_best = result["val_loss"], 0
        else:
            self.state.evals_since_best += 1
        self._sample(step, writer)
        patience = tc.early_stop_patience
        return patience > 0 and self.state.evals_since_best >= patience

    def _sample(self, step: int, writer=None) -> None:
        if self.sampler is None or self.cfg.train.sample_tokens <= 0 or step == 0:
            return
        text = self.sampler(step)
        if writer is not None:
            writer.text("sample", text, step)
        log.info("sample at step %d:\n%s\n", step, text)

    def save(self) -> None:
        """Save a checkpoint of this step (on every rank: it gathers or writes shards)."""
        evaluated_now = self.state.last_eval_step == self.state.step
        self.checkpointer.save(self.state.step, self.model, self.optimizer, self.state_dict(),
                               model_config=self.model.config,
                               val_loss=self.state.last_val_loss if evaluated_now else None)
