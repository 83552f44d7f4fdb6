"""Typed config sections (``schema``) and how they are loaded and saved (``loader``)."""

from gptforge.config.loader import load_config, save_config, to_toml
from gptforge.config.schema import Config

__all__ = ["Config", "load_config", "save_config", "to_toml"]
