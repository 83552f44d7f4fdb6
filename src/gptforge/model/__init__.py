"""The GPT architecture: config, layers, attention, and the model (imports only torch).

``GPT`` is imported lazily, so reading a config (``gptforge.model.config``) does not import torch.
"""

from gptforge.model.config import ModelConfig

__all__ = ["GPT", "ModelConfig"]


def __getattr__(name: str):
    if name == "GPT":
        from gptforge.model.gpt import GPT

        return GPT
    raise AttributeError(name)
