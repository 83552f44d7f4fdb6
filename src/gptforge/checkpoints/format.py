"""Checkpoint directories: self-contained, written atomically, pruned to the best and newest.

A checkpoint ``RUN_DIR/ckpt/step-000500/`` holds everything needed to use or resume a model:

- ``model.safetensors``: the weights, full float32, from the unwrapped module (no ``_orig_mod.``
  or ``module.`` prefixes), in a format that cannot execute code when loaded;
- ``model.json``: format version, the model config, the step, its val loss, the tokenizer's kind
  and fingerprint;
- ``tokenizer/``: a copy of the tokenizer file, so generation needs nothing else;
- ``trainer_state.pt``: optimizer, step, tokens seen, data-loader position and RNG states,
  loaded with ``torch.load(weights_only=True)`` (plain tensors and containers only).

A *sharded* checkpoint (``train.ckpt_format=sharded``, for models too large to gather on one
process) has, in place of ``model.safetensors`` and the optimizer inside ``trainer_state.pt``, two
``torch.distributed.checkpoint`` directories written by all ranks in parallel: ``model/`` and
``optimizer/`` (one ``__<rank>_0.distcp`` file per rank and a ``.metadata`` index). ``model.json``
says ``"weights": "sharded"``. It resumes on any world size and loads for generation in one
process like a full one; ``gptforge export`` turns it into a full one.

The directory is assembled under a temporary name and renamed into place; only then is the
``RUN_DIR/latest`` pointer (a one-line text file, portable where symlinks are not) replaced. A crash
at any moment therefore leaves ``latest`` naming a complete checkpoint.
"""

from __future__ import annotations

import errno
import json
import logging
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from gptforge import atomic
from gptforge.errors import GptforgeError
from gptforge.model.config import ModelConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CKPT_DIR = "ckpt"
SHARDED_MODEL, SHARDED_OPTIMIZER = "model", "optimizer"  # DCP directories of a sharded checkpoint


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def staging_dir(run_dir: Path, step: int) -> Path:
    """Where every rank writes its shards of checkpoint ``step`` before it is renamed into place.

    The name is a function of the step alone, so all ranks agree on it without talking.
    """
    return Path(run_dir) / CKPT_DIR / f".tmp-{checkpoint_name(step)}-sharded"


def save_checkpoint(run_dir: Path, *, step: int, weights: dict[str, torch.Tensor] | None,
                    model_config: ModelConfig, tokenizer_dir: Path, tokenizer_info: dict,
                    trainer_state: dict, val_loss: float | None,
                    extra_meta: dict | None = None, staged: Path | None = None) -> Path:
    """Write checkpoint ``step`` atomically and point ``RUN_DIR/latest`` at it.

    ``weights`` is a full state dict without tied aliases (see ``state.weights_to_save``), or
    None for a sharded checkpoint, whose DCP directories the ranks have already written into
    ``staged`` (see :func:`staging_dir`); the rest is added there and it is renamed
    into place.
    """
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    target = run_dir / CKPT_DIR / checkpoint_name(step)
    meta = {"format_version": FORMAT_VERSION, "step": step, "val_loss": val_loss,
            "model": model_config.to_dict(), "tokenizer": tokenizer_info, **(extra_meta or {})}
    if weights is None:
        meta["weights"] = "sharded"
    try:
        with atomic.directory(target, staged=staged) as tmp:
            if weights is not None:
                contiguous = {k: v.contiguous() for k, v in weights.items()}
                save_file(contiguous, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")
            torch.save(trainer_state, tmp / "trainer_state.pt")
        atomic.write_text(run_dir / "latest", f"{CKPT_DIR}/{target.name}\n")
    except (OSError, RuntimeError, SafetensorError) as err:
        # torch.save reports a failed write as RuntimeError, safetensors as SafetensorError.
        previous = latest_checkpoint(run_dir)
        kept = f"; the last checkpoint {previous} is intact" if previous else ""
        raise GptforgeError(f"could not write checkpoint {target}: {_write_failure(err)}{kept}") \
            from err
    return target


def _write_failure(err: Exception) -> str:
    """A short reason for a failed write ("disk full" whatever layer reported it)."""
    text = str(err)
    if getattr(err, "errno", None) == errno.ENOSPC or "No space left" in text \
            or "StorageFull" in text:
        return "disk full"
    if isinstance(err, OSError):
        return err.strerror or text
    return _first_line(text)


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:300]


def _damaged(path: Path, err: Exception) -> GptforgeError:
    return GptforgeError(f"{path} is damaged ({_first_line(str(err))}); copy the checkpoint "
                         "again or use another one")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a cut-short or foreign file is one clear error."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise _damaged(path, err) from None


def is_sharded(ckpt: Path) -> bool:
    """Whether ``ckpt`` holds DCP shards (``model/``, ``optimizer/``) rather than safetensors."""
    return (Path(ckpt) / SHARDED_MODEL / ".metadata").is_file()


def weights_sha256(ckpt: Path) -> str:
    """A fingerprint of the checkpoint's weights: sha256 of ``model.safetensors`` (the same as
    ``sha256sum``), or for a sharded checkpoint of its DCP files' names and bytes in name order."""
    import hashlib

    ckpt = Path(ckpt)
    if not is_sharded(ckpt):
        return _file_digest(ckpt / "model.safetensors", hashlib.sha256()).hexdigest()
    digest = hashlib.sha256()
    for path in sorted((ckpt / SHARDED_MODEL).iterdir()):
        digest.update(path.name.encode() + b"\0")
        _file_digest(path, digest)
    return digest.hexdigest()


def _file_digest(path: Path, digest):
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


def has_weights(ckpt: Path) -> bool:
    return (Path(ckpt) / "model.safetensors").is_file() or is_sharded(ckpt)


def read_weights(ckpt: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's weights as a full state dict for ``model`` (tied aliases filled in)."""
    state = read_safetensors(Path(ckpt) / "model.safetensors")
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first and name not in state and first[id(param)] in state:
            state[name] = state[first[id(param)]]
        first.setdefault(id(param), name)
    expected = set(model.state_dict())
    if set(state) != expected:
        diff = sorted(set(state) ^ expected)[:3]
        raise GptforgeError(f"{ckpt}: weights do not fit the model (mismatched names: {diff})")
    return state


def is_fine_tuned(meta: dict) -> bool:
    """Whether a checkpoint's ``model.json`` says it went through a chat stage (SFT, DPO, RL
    write ``fine_tuned``; LoRA adapters and their merged exports count too)."""
    return bool({"fine_tuned", "lora", "merged_lora"} & set(meta))


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = Path(run_dir) / pointer.read_text().strip()
    return path if (path / "model.json").is_file() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint path or a run directory (its latest checkpoint)."""
    path = Path(path)
    if (path / "model.json").is_file():
        return path
    if not path.exists():
        raise GptforgeError(f"no such checkpoint or run directory: {path}")
    latest = latest_checkpoint(path)
    if latest is None:
        raise GptforgeError(f"{path} holds no checkpoint (no model.json, no valid 'latest' "
                            "pointer); train first or pass a ckpt/step-N directory")
    return latest


def read_meta(ckpt: Path) -> dict:
    try:
        meta = json.loads((Path(ckpt) / "model.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GptforgeError(f"{ckpt}/model.json is unreadable ({_first_line(str(err))}); "
                            "the checkpoint is damaged") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise GptforgeError(f"{ckpt}/model.json is not a gptforge checkpoint description (a JSON "
                            "object with a 'model' object); the checkpoint is damaged")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise GptforgeError(f"{ckpt}: checkpoint format {version} is not supported by this "
                            f"gptforge (format {FORMAT_VERSION}); use a matching gptforge version")
    return meta


def model_config_of(meta: dict, ckpt: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise GptforgeError(f"{ckpt}/model.json: invalid model config ({err})") from None


def load_weights(model: nn.Module, ckpt: Path) -> None:
    """Load weights strictly: every tensor must match the model's names and shapes.

    From a sharded checkpoint, in one process or (as a collective) in all ranks of a run.
    """
    from safetensors.torch import load_model

    if is_sharded(ckpt):
        from gptforge.checkpoints.state import load_sharded_model

        load_sharded_model(model, Path(ckpt) / SHARDED_MODEL)
        return
    path = Path(ckpt) / "model.safetensors"
    try:
        load_model(model, str(path), strict=True)
    except SafetensorError as err:
        raise _damaged(path, err) from None
    except (RuntimeError, OSError) as err:
        raise GptforgeError(f"{ckpt}: weights do not fit the model "
                            f"({_first_line(str(err))})") from None


def load_trainer_state(ckpt: Path) -> dict:
    path = Path(ckpt) / "trainer_state.pt"
    if not path.is_file():
        raise GptforgeError(f"{ckpt} has no trainer_state.pt: it can be used for generation "
                            "but not resumed")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused an object: never run it
        raise GptforgeError(f"{path} was refused: it holds objects other than tensors and plain "
                            "containers, which a gptforge checkpoint never does (a foreign or "
                            "tampered file); resume from another checkpoint") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise _damaged(path, err) from None
    if not isinstance(state, dict):
        raise GptforgeError(f"{path} is damaged (not a dictionary); resume from another "
                            "checkpoint")
    return state
