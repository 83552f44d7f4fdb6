"""Exporting a checkpoint: one self-contained directory with every weight, ready to share or use.

A training checkpoint may depend on something outside itself (a LoRA checkpoint needs its base
checkpoint) and carries what only resuming needs (``trainer_state.pt``). An export has neither:
``model.safetensors`` with all weights in float32 (LoRA adapters merged into them),
``model.json`` without a ``lora`` entry, and ``tokenizer/``. It loads anywhere a checkpoint does
(``gptforge generate``, ``gptforge chat``, ``gptforge.load``, ``finetune.init_from``) but cannot
be resumed.

Each output format is one writer filling a temporary directory, which is renamed into place only
when complete (``atomic.directory``): ``native`` (a gptforge checkpoint) or ``huggingface`` (a
``transformers`` checkpoint directory, see ``huggingface.py``). ``gguf`` writes one file instead
(llama.cpp's format, see ``gguf.py``), also through a temporary name.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from gptforge import atomic
from gptforge.checkpoints.format import read_meta, resolve_checkpoint
from gptforge.checkpoints.loading import base_checkpoint, build_model, lora_settings
from gptforge.checkpoints.state import weights_to_save
from gptforge.errors import GptforgeError
from gptforge.model.gpt import GPT

log = logging.getLogger(__name__)


def write_native(model: GPT, meta: dict, source: Path, out: Path) -> None:
    """A gptforge checkpoint directory (without trainer state) in ``out``."""
    from safetensors.torch import save_file

    weights = weights_to_save(model, model.state_dict())
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    exported = {k: v for k, v in meta.items() if k not in ("lora", "weights")}
    exported["model"] = model.config.to_dict()  # an adapter on a tied lm_head unties it
    exported["exported_from"] = str(source.resolve())
    if "lora" in meta:
        exported["merged_lora"] = meta["lora"]  # provenance: which adapters, which base
    (out / "model.json").write_text(json.dumps(exported, indent=2) + "\n")
    shutil.copytree(source / "tokenizer", out / "tokenizer")


def write_huggingface(model: GPT, meta: dict, source: Path, out: Path) -> None:
    """A Hugging Face ``transformers`` checkpoint (GPT-2, Llama or Qwen3) in ``out``."""
    from gptforge.checkpoints.huggingface import write_huggingface as write

    write(model, meta, source, out)


def write_gguf(model: GPT, meta: dict, source: Path, out: Path, **options) -> None:
    """One GGUF file for llama.cpp and Ollama at ``out`` (see ``gguf.py``)."""
    try:
        from gptforge.checkpoints.gguf import write_gguf as write
    except ModuleNotFoundError as err:
        raise GptforgeError(f"--format gguf needs the {err.name} package: "
                            "pip install 'gptforge[gguf]'") from None

    write(model, meta, source, out, **options)


# format name -> writer(model, source meta, source checkpoint, temporary output directory)
WRITERS: dict[str, Callable[[GPT, dict, Path, Path], None]] = {
    "native": write_native, "huggingface": write_huggingface}
# format name -> writer(model, meta, source, output file, **options) that writes it atomically
FILE_WRITERS: dict[str, Callable[..., None]] = {"gguf": write_gguf}


def export_checkpoint(source: str | Path, out: str | Path, *, merge_lora: bool = False,
                      format: str = "native", **options) -> Path:
    """Write checkpoint ``source`` (or a run directory's latest) to ``out`` in ``format``.

    A LoRA checkpoint is exported only with ``merge_lora``: its adapters are folded into the base
    weights. ``out`` may be missing, empty or an earlier export (which is replaced); anything
    else there is refused rather than deleted. ``options`` go to a file format's writer
    (``gguf``: ``dtype``, ``ollama``).
    """
    if format not in WRITERS and format not in FILE_WRITERS:
        raise GptforgeError(f"unknown export format '{format}' (choose one of: "
                            f"{', '.join([*WRITERS, *FILE_WRITERS])})")
    ckpt = resolve_checkpoint(source)
    meta = read_meta(ckpt)
    if "lora" in meta and not merge_lora:
        raise GptforgeError(f"{ckpt} holds LoRA adapters, not a full model; add --merge-lora to "
                            "fold them into the base weights and export the merged model")
    out = Path(out)
    if format in FILE_WRITERS:
        FILE_WRITERS[format](build_model(ckpt, merge=True), meta, ckpt, out, **options)
        return out
    _check_destination(out, ckpt, meta)
    model = build_model(ckpt, merge=True)
    try:
        with atomic.directory(out) as tmp:
            WRITERS[format](model, meta, ckpt, tmp)
    except OSError as err:
        raise GptforgeError(f"could not write the export {out}: {err.strerror or err}") from err
    return out


def _check_destination(out: Path, ckpt: Path, meta: dict) -> None:
    protected = [ckpt]
    if "lora" in meta:
        protected.append(base_checkpoint(ckpt, lora_settings(meta, ckpt)))
    if any(out.resolve() == p.resolve() for p in protected):
        raise GptforgeError(f"--out {out} is the checkpoint being exported (or its base); "
                            "choose another directory")
    if out.is_file():
        raise GptforgeError(f"--out {out} is a file; give a directory path")
    earlier_export = (out / "model.json").is_file() or (out / "config.json").is_file()
    if out.is_dir() and any(out.iterdir()) and not earlier_export:
        raise GptforgeError(f"--out {out} is a non-empty directory that is not a checkpoint; "
                            "refusing to replace it: choose a new or empty directory")
