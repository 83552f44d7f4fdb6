"""The GPT architecture: config, layers, attention, and the model (imports only torch)."""

from gptforge.model.config import ModelConfig
from gptforge.model.gpt import GPT

__all__ = ["GPT", "ModelConfig"]
