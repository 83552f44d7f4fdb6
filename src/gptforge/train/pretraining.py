"""The pretraining stage: prepared token shards (or a weighted mixture of them), next-token loss.

It finds (or, for a built-in corpus, prepares) the data, takes the vocabulary from the data's
tokenizer, starts from random weights, and reads batches of ``block_size`` windows from the shards.
With ``init_from`` it starts instead from a trained model's architecture and weights (continued
pretraining, ``init_from.py``), on data prepared with that model's tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from gptforge import atomic
from gptforge.checkpoints.checkpointer import load_full_weights
from gptforge.checkpoints.format import load_weights
from gptforge.config.schema import Config
from gptforge.data.manifest import Manifest
from gptforge.errors import GptforgeError
from gptforge.model.gpt import GPT
from gptforge.runtime import distributed
from gptforge.train.freeze import freeze
from gptforge.train.init_from import StartingPoint
from gptforge.train.objectives import LanguageModeling

log = logging.getLogger(__name__)


def prepared_data(cfg: Config) -> Manifest:
    """The manifest of the data to train on, preparing a built-in corpus on first use."""
    from gptforge.data.prepare import ensure_builtin

    if cfg.data.mixture:  # the first dataset of a mixture stands for all (same tokenizer)
        from gptforge.data.loader import parse_mixture
        return Manifest.read(parse_mixture(cfg.data.mixture)[0][0])
    data_dir = Path(cfg.data.dir)
    if not (data_dir / "manifest.json").is_file():
        if not cfg.data.corpus:
            raise GptforgeError(
                f"data.dir '{data_dir}' holds no prepared data (no manifest.json); run "
                f"`gptforge prepare --input FILES --out {data_dir}` or set data.corpus=shakespeare")
        log.info("preparing the built-in '%s' corpus into %s", cfg.data.corpus, data_dir)
        ensure_builtin(cfg.data.corpus, data_dir, tokenizer=cfg.data.tokenizer,
                       vocab_size=cfg.data.vocab_size or None)
    return Manifest.read(data_dir)


def with_vocab(cfg: Config, manifest: Manifest) -> Config:
    vocab = manifest.tokenizer.vocab_size
    if cfg.model.vocab_size == 0:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    if cfg.model.vocab_size < vocab:
        raise GptforgeError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                            f"tokenizer's {vocab}; set model.vocab_size=0 to take it from the data")
    return cfg


class Pretraining:
    """The pretraining stage: prepared token shards (or a mixture), next-token objective."""

    name = "train"

    def __init__(self, model_overrides: tuple[str, ...] | list[str] = ()):
        # The model.* keys set on the command line: with init_from they must agree with it.
        self.model_overrides = tuple(model_overrides)
        self.start: StartingPoint | None = None

    def setup(self, cfg: Config, dist_info) -> tuple[Config, Path, dict]:
        """(config with the vocabulary filled in, tokenizer dir, tokenizer info)."""
        if dist_info.is_main:
            prepared_data(cfg)  # prepares a built-in corpus on first use
        distributed.barrier(dist_info)
        self.manifest = prepared_data(cfg)
        tokenizer = self.manifest.tokenizer
        if not cfg.finetune.init_from:
            return with_vocab(cfg, self.manifest), self.manifest.tokenizer_dir, tokenizer.info
        self.start = StartingPoint.resolve(cfg.finetune.init_from, cfg.model,
                                           self.model_overrides, Path(cfg.train.out_dir),
                                           dist_info)
        self.start.check_tokenizer(tokenizer.sha256, self.manifest.dir)
        log.info("starting from the weights of %s", self.start.ckpt)
        cfg = dataclasses.replace(cfg, model=self.start.model_config)
        return with_vocab(cfg, self.manifest), self.manifest.tokenizer_dir, tokenizer.info

    def init_weights(self, cfg: Config, model: GPT) -> None:
        """The starting checkpoint's weights with ``init_from``; else the random ones."""
        if self.start is not None:
            load_weights(model, self.start.ckpt)

    def init_optimizer(self, cfg: Config, model: GPT, optimizer) -> None:
        """``train.init_optimizer``: the starting checkpoint's optimizer state."""
        init_optimizer(cfg, self.start, model, optimizer)

    def loaders(self, cfg: Config, dist_info, run_dir: Path):
        return build_loaders(cfg, self.manifest, dist_info, run_dir)

    def build_objective(self, cfg: Config, model: GPT):
        """The objective; called once the initial weights are in place (``train.freeze``
        applied here, before the optimizer is built)."""
        freeze(model, cfg.train.freeze)
        return LanguageModeling()

    def checkpoint_extras(self, cfg: Config, model: GPT):
        """All weights, nothing extra in model.json."""
        return None, {}

    def load_run_weights(self, model: GPT, ckpt: Path) -> None:
        load_full_weights(model, ckpt)


def init_optimizer(cfg: Config, start: StartingPoint | None, model: GPT, optimizer) -> None:
    """Carry the optimizer state of ``start`` over when ``train.init_optimizer`` asks for it."""
    if not cfg.train.init_optimizer:
        return
    if start is None:
        raise GptforgeError("train.init_optimizer=true needs init_from=CHECKPOINT (a gptforge "
                            "checkpoint whose optimizer state to carry over)")
    start.load_optimizer_state(model, optimizer)


def build_loaders(cfg: Config, manifest: Manifest, dist_info, run_dir: Path):
    """(train loader, val loader or None) for one prepared dataset or a weighted mixture."""
    from gptforge.data.loader import BatchLoader, MixtureLoader, parse_mixture
    from gptforge.data.shards import open_split

    data_dir = manifest.dir
    tc, block = cfg.train, cfg.model.block_size
    kwargs = {"rank": dist_info.rank, "world_size": dist_info.world_size,
              "vocab_size": manifest.tokenizer.vocab_size}
    if not cfg.data.mixture:
        train = BatchLoader(open_split(data_dir, "train"), block, tc.batch_size, seed=tc.seed,
                            split="train", **kwargs)
        val = None
        if manifest.tokens("val") > 0:
            val = BatchLoader(open_split(data_dir, "val"), block, tc.batch_size,
                              seed=tc.seed + 1, split="val", shuffle_offset=False, **kwargs)
        else:
            log.warning("%s has no val split: no evaluation, best-checkpoint tracking or early "
                        "stopping (prepare with --val-fraction > 0 for them)", data_dir)
        return train, val
    sources = parse_mixture(cfg.data.mixture)
    dirs, weights = [Path(p) for p, _ in sources], [w for _, w in sources]
    manifests = [Manifest.read(d) for d in dirs]
    for d, m in zip(dirs[1:], manifests[1:]):
        if m.tokenizer.sha256 != manifest.tokenizer.sha256:
            raise GptforgeError(f"data.mixture: {d} was prepared with another tokenizer than "
                                f"{dirs[0]}; prepare all with the same --tokenizer FILE")
    train = MixtureLoader([open_split(d, "train") for d in dirs], weights, block, tc.batch_size,
                          seed=tc.seed, split="train", **kwargs)
    val = None
    if all(m.tokens("val") > 0 for m in manifests):
        val = MixtureLoader([open_split(d, "val") for d in dirs], weights, block, tc.batch_size,
                            seed=tc.seed + 1, split="val", shuffle_offset=False, **kwargs)
    if dist_info.is_main:
        record = [{"dir": str(d), "weight": w, "train_tokens": m.tokens("train")}
                  for d, w, m in zip(dirs, weights, manifests)]
        atomic.write_text(run_dir / "mixture.json", json.dumps(record, indent=2) + "\n")
    log.info("mixture: %s", ", ".join(f"{d} {w:.0%}" for d, w in zip(dirs, weights)))
    return train, val
