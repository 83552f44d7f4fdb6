"""gptforge: train GPT-style language models from scratch and put them to use.

Python API::

    import gptforge
    model = gptforge.load("runs/shakespeare_char")       # a run directory or a checkpoint
    print(model.generate("ROMEO:", max_new_tokens=100, temperature=0.8))

Importing the package does nothing else: no logging set-up, no device probing, no downloads.
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(path, device: str = "auto", compile: bool = False, quantize: str | None = None):
    """Load a checkpoint (or a run directory's latest one) for text generation.

    ``compile=True`` decodes through a compiled step: several times faster per token, after a
    one-off compilation of 20-30 s; worth it for long or many generations. ``quantize="int8"``
    keeps the blocks' weights in int8 with per-row scales (about 4x smaller than float32).
    """
    from gptforge.inference.textgen import TextGenerator

    return TextGenerator.from_checkpoint(path, device=device, compile=compile, quantize=quantize)


__all__ = ["load", "__version__"]
