"""Assembling a training run from a config and a stage: model, optimizer, loop, resume.

This is the library behind ``gptforge train``, ``sft`` and ``dpo``. It resolves the device and
precision, lets the stage set up its data and initial weights (``stage.py``), builds the model,
the optimizer, the loaders and the checkpointer, restores a checkpoint when resuming, saves the
resolved config, and runs the loop.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path

import torch

from gptforge import atomic
from gptforge.checkpoints.checkpointer import Checkpointer
from gptforge.checkpoints.format import latest_checkpoint, read_meta
from gptforge.config.loader import config_to_dict, save_config
from gptforge.config.schema import Config
from gptforge.errors import GptforgeError
from gptforge.metrics.sinks import truncate_after
from gptforge.model.config import ModelConfig
from gptforge.model.gpt import GPT
from gptforge.runtime import distributed
from gptforge.runtime.activation_checkpointing import apply_activation_checkpointing
from gptforge.runtime.device import (
    enable_tf32,
    peak_flops,
    resolve_device,
    resolve_precision,
    seed_everything,
)
from gptforge.runtime.host_memory import keep_freed_memory
from gptforge.train import autotune
from gptforge.train.loop import Trainer, TrainingParts
from gptforge.train.objectives import LanguageModeling
from gptforge.train.optim import build_optimizer
from gptforge.train.pretraining import Pretraining
from gptforge.train.stage import Stage

log = logging.getLogger(__name__)


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool, command: str = "train") -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GptforgeError(f"cannot create run directory {run_dir}: {err.strerror}") from None
    try:  # a probe: os.access misjudges ACLs and network file systems
        tempfile.TemporaryFile(dir=run_dir).close()
    except OSError as err:
        raise GptforgeError(f"run directory {run_dir} is not writable ({err.strerror}); make it "
                            "writable, or copy the run elsewhere and use that") from None
    existing = latest_checkpoint(run_dir)
    if existing and not resume and not overwrite:
        raise GptforgeError(f"{run_dir} already holds a run (latest: {existing.name}); continue "
                            f"it with `gptforge {command} --resume {run_dir}`, pass --overwrite to "
                            "start over, or set train.out_dir")
    if overwrite and not resume:
        import shutil
        for name in ("ckpt", "tb", "metrics.jsonl", "latest", "best"):
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False,
          stage: Stage | None = None) -> int:
    """Run (or, with ``resume``, continue) a training stage as configured; return an exit code.

    ``stage`` is pretraining unless given (see :mod:`gptforge.train.finetune` for SFT and DPO).
    Under torchrun every process runs this function; rank 0 alone prepares data and writes files.
    """
    if cfg.runtime.threads > 0:
        torch.set_num_threads(cfg.runtime.threads)
    keep_freed_memory()  # steps reuse freed buffers instead of faulting in fresh pages
    device = resolve_device(cfg.runtime.device)
    dist_info, device = distributed.init_distributed(device)
    created = _first_missing(Path(cfg.train.out_dir))
    try:
        if not dist_info.is_main:  # one voice: other ranks report only problems
            logging.getLogger("gptforge").setLevel(logging.WARNING)
        return _train(cfg, stage or Pretraining(), resolve_precision(device, cfg.runtime.dtype),
                      dist_info, resume=resume, overwrite=overwrite)
    except BaseException:
        if dist_info.is_main and created is not None:  # a failed start leaves no empty run dir
            _remove_empty_dirs(Path(cfg.train.out_dir), created)
        raise
    finally:
        distributed.teardown()


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of ``path`` that does not exist yet; None if ``path`` exists."""
    missing = None
    for directory in (path, *path.parents):
        if directory.exists():
            break
        missing = directory
    return missing


def _remove_empty_dirs(path: Path, top: Path) -> None:
    """Remove ``path`` and its parents up to ``top`` while they are empty."""
    for directory in (path, *path.parents):
        try:
            directory.rmdir()
        except OSError:  # not empty: something worth keeping was written
            return
        if directory == top:
            return


def _train(cfg: Config, stage: Stage, precision, dist_info, *, resume: bool,
           overwrite: bool) -> int:
    enable_tf32(precision.device)
    run_dir = Path(cfg.train.out_dir)
    if dist_info.is_main:
        check_run_dir(run_dir, resume, overwrite, stage.name)
    cfg, tokenizer_dir, tokenizer_info = stage.setup(cfg, dist_info)
    ckpt = _checkpoint_to_resume(run_dir, tokenizer_info) if resume else None

    seed_everything(cfg.train.seed)
    model = GPT(cfg.model).to(precision.device)
    stage.init_weights(cfg, model)
    objective = stage.build_objective(cfg, model)  # may add LoRA adapters or copy a reference
    if dist_info.enabled:  # same initial weights everywhere, then a dropout stream per rank
        seed_everything(cfg.train.seed + dist_info.rank)
    if cfg.runtime.activation_checkpointing:  # before sharding and compiling, as torchtitan does
        apply_activation_checkpointing(model)
    # Measured on the bare model, in this process alone (probes must not be collectives).
    cfg = with_grad_accum(resolve_batch_size(cfg, model, objective, precision, dist_info),
                          dist_info.world_size)
    # dtype, attention precision and compiling: timed where `auto` leaves a choice (rank 0).
    choice = autotune.choose(cfg, model, precision.device, dist_info)
    precision = autotune.apply(choice, model, precision.device)
    train_model = distributed.wrap_model(model, cfg.runtime.parallel, dist_info, precision)
    if choice.candidate.compile:
        train_model = torch.compile(train_model)
    optimizer = build_optimizer(model, cfg.optim, precision.device)
    if ckpt is None:  # a resumed run restores its own optimizer below
        stage.init_optimizer(cfg, model, optimizer)
    train_loader, val_loader = stage.loaders(cfg, dist_info, run_dir)
    weights_filter, extra_meta = stage.checkpoint_extras(cfg, model)
    checkpointer = Checkpointer(
        run_dir, tokenizer_dir=tokenizer_dir, tokenizer_info=tokenizer_info,
        sharded=cfg.train.ckpt_format == "sharded", keep_last=cfg.train.keep_last,
        keep_best=cfg.train.keep_best, dist_info=dist_info, weights_filter=weights_filter,
        extra_meta=extra_meta, load_weights=stage.load_run_weights)
    parts = TrainingParts(
        model=model, train_model=train_model, optimizer=optimizer, objective=objective,
        train_loader=train_loader, val_loader=val_loader, precision=precision, dist=dist_info,
        flops_per_token=_flops_per_token(model, objective), peak_flops=peak_flops(precision),
        sampler=_sampler(model, tokenizer_dir, cfg, precision))
    trainer = Trainer(cfg, stage, parts, checkpointer)
    if ckpt is not None:
        trainer.restore(ckpt)
        if dist_info.is_main:
            truncate_after(run_dir / "metrics.jsonl", trainer.state.step)
        log.info("resuming from %s (step %d)", ckpt, trainer.state.step)
    if dist_info.is_main:
        save_config(cfg, run_dir / "config.toml")
        _record_choice(run_dir, choice)
    _print_summary(cfg, model, precision, train_loader, run_dir, dist_info.world_size)
    log.info("runtime: %s", choice.describe())
    code = trainer.fit()
    tc = cfg.train
    if code == 0 and tc.sample_tokens > 0 and tc.num_samples > 0:
        for i in range(tc.num_samples):
            # Seeds distinct from the per-evaluation samples (seeded by their step).
            text = trainer.sampler(-1 - i)  # every rank runs it: FSDP2 forwards are collective
            if dist_info.is_main:
                print(f"--- sample {i + 1} ---\n{text}")
    return code


def _record_choice(run_dir: Path, choice: autotune.Choice) -> None:
    """What the runtime choice was and why: RUN_DIR/runtime_choice.json, and as comments at the
    end of config.toml (which still loads with ``-c``, keeping ``auto`` to choose again)."""
    text = json.dumps(choice.to_dict(), indent=2) + "\n"
    atomic.write_text(run_dir / "runtime_choice.json", text)
    path = run_dir / "config.toml"
    atomic.write_text(path, path.read_text() + autotune.config_comment(choice))


def _flops_per_token(model: GPT, objective) -> int:
    """Training FLOPs per token for MFU: the model's forward and backward (frozen weights, as in
    LoRA, skip their weight gradients), plus the forward of a frozen reference model (DPO)."""
    flops = model.flops_per_token()
    reference = objective.reference
    if reference is not None:
        flops += reference.forward_flops_per_token()
    return flops


def resolve_batch_size(cfg: Config, model, objective, precision, dist_info) -> Config:
    """``train.batch_size=auto``: measure the largest micro-batch that fits (CUDA only).

    ``model`` is the bare model, before DDP/FSDP2 wrapping and compiling: each rank probes alone
    and the ranks then agree on the smallest answer. Under FSDP2 the unsharded model is probed,
    which errs on the safe side. A DPO batch of b pairs runs 2b rows, so 2b rows are probed.
    """
    from gptforge.runtime.batch_size import auto_batch_size, cuda_probe

    if cfg.train.batch_size != "auto":
        return cfg
    if precision.device.type != "cuda":
        raise GptforgeError("train.batch_size=auto needs a CUDA GPU (it measures GPU memory); "
                            "set a number, e.g. train.batch_size=16")
    probe = cuda_probe(model, LanguageModeling(), precision, cfg.model.block_size,
                       cfg.model.vocab_size,
                       data_parallel=dist_info.enabled and cfg.runtime.parallel == "ddp")
    rows = objective.inputs_per_batch
    batch = auto_batch_size(lambda b: probe(b * rows), cfg.train.global_batch_tokens,
                            cfg.model.block_size, dist_info.world_size,
                            agree=lambda n: distributed.min_over_ranks(n, dist_info,
                                                                       precision.device))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch))


def with_grad_accum(cfg: Config, world_size: int) -> Config:
    """Derive ``train.grad_accum`` from ``train.global_batch_tokens`` when that is set."""
    tc = cfg.train
    if tc.global_batch_tokens <= 0:
        return cfg
    per_micro = tc.batch_size * cfg.model.block_size * world_size
    if tc.global_batch_tokens % per_micro:
        raise GptforgeError(
            f"train.global_batch_tokens={tc.global_batch_tokens} is not a multiple of "
            f"batch_size x block_size x processes = {tc.batch_size} x {cfg.model.block_size} x "
            f"{world_size} = {per_micro}")
    accum = tc.global_batch_tokens // per_micro
    return dataclasses.replace(cfg, train=dataclasses.replace(tc, grad_accum=accum))


def _checkpoint_to_resume(run_dir: Path, tokenizer_info: dict) -> Path:
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise GptforgeError(f"--resume: {run_dir} holds no checkpoint to resume from")
    meta = read_meta(ckpt)
    saved, current = meta["tokenizer"].get("sha256"), tokenizer_info.get("sha256")
    if saved != current:
        raise GptforgeError(f"{ckpt} was trained with a different tokenizer than the one in "
                            "data.dir (fingerprints differ); resume with the original data")
    return ckpt


def _sampler(model: GPT, tokenizer_dir: Path, cfg: Config, precision):
    """A function step -> sample text, from the model being trained (seeded by the step)."""
    from gptforge.inference.textgen import TextGenerator
    from gptforge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)

    def sample(step: int) -> str:
        was_training = model.training
        generator = TextGenerator(model, tokenizer)
        with precision.autocast():
            text = generator.generate(cfg.train.sample_prompt, temperature=0.8, top_k=50,
                                      max_new_tokens=cfg.train.sample_tokens,
                                      seed=(cfg.train.seed * 1_000_003 + step) % 2**63)
        model.train(was_training)
        return cfg.train.sample_prompt + text

    return sample


def _print_summary(cfg: Config, model: GPT, precision, loader, run_dir: Path,
                   world_size: int) -> None:
    tc = cfg.train
    tokens_per_step = tc.batch_size * tc.grad_accum * cfg.model.block_size * world_size
    log.info("model: %.2fM parameters, %d layers, %d heads, width %d, context %d, vocab %d",
             model.num_params() / 1e6, cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd,
             cfg.model.block_size, cfg.model.vocab_size)
    processes = f" x {world_size} processes ({cfg.runtime.parallel})" if world_size > 1 else ""
    log.info("training: %d steps x %d tokens/step (batch %d x accum %d%s) on %s (%s), %d train "
             "windows per epoch; run dir %s", tc.max_steps, tokens_per_step, tc.batch_size,
             tc.grad_accum, processes, precision.device, precision.name,
             loader.windows_per_epoch, run_dir)


def resume_config(run_dir: Path, overrides: list[str]) -> Config:
    """The saved config of a run with ``overrides`` applied; architecture changes are refused."""
    import sys

    from gptforge.config.loader import load_config
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise GptforgeError(f"--resume: {path} not found; is {run_dir} a gptforge run directory?")
    saved = tomllib.loads(path.read_text())
    cfg = load_config(None, overrides, base=saved)
    # A key missing from an older run's file had its default value then (fields only get added).
    defaults = dataclasses.asdict(ModelConfig())
    changed = [k for k, v in config_to_dict(cfg)["model"].items()
               if saved["model"].get(k, defaults[k]) != v]
    if changed:
        raise GptforgeError(f"--resume cannot change the architecture (model.{changed[0]}); "
                            "start a new run instead")
    out = Path(cfg.train.out_dir)
    if out.resolve() != Path(run_dir).resolve():
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(run_dir)))
    return cfg
