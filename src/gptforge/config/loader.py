"""Reading, overriding, validating and saving configs.

Precedence: dataclass defaults < preset/TOML file < ``section.key=value`` overrides. Every key is
checked against the schema: an unknown key fails with the closest valid name, a value of the
wrong type fails with the expected type. The resolved config is written to ``RUN_DIR/config.toml``
so that ``gptforge train -c RUN_DIR/config.toml`` reproduces the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

from gptforge import atomic
from gptforge.config.schema import Config
from gptforge.errors import GptforgeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_PRESET = "shakespeare_char"


def preset_names() -> list[str]:
    files = resources.files("gptforge").joinpath("configs").iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".toml"))


def resolve_source(source: str) -> tuple[str, str]:
    """(text, label) of a config given as a file path or a preset name."""
    path = Path(source)
    if path.is_file():
        return path.read_text(encoding="utf-8"), str(path)
    name = source[:-5] if source.endswith(".toml") else source
    if name in preset_names():
        preset = resources.files("gptforge").joinpath("configs", f"{name}.toml")
        return preset.read_text(encoding="utf-8"), f"preset {name}"
    raise GptforgeError(
        f"no config file or preset named '{source}'; presets: {', '.join(preset_names())}")


def load_config(source: str | None = None, overrides: list[str] = (),
                base: dict | None = None) -> Config:
    """Build a Config from defaults, then ``base`` (a dict), then a file/preset, then overrides."""
    tree: dict[str, dict] = {}
    if base:
        merge_tree(tree, base, "saved config")
    if source is not None:
        text, label = resolve_source(source)
        try:
            merge_tree(tree, tomllib.loads(text), label)
        except tomllib.TOMLDecodeError as err:
            raise GptforgeError(f"{label}: invalid TOML ({err})") from None
    for item in overrides:
        section, key, value = parse_override(item)
        merge_tree(tree, {section: {key: value}}, "command line")
    return build_config(tree)


# Keys that may be given without their section on the command line.
ALIASES = {"init_from": "finetune.init_from"}


def override_keys(overrides: list[str], section: str) -> list[str]:
    """The keys of ``section`` that ``overrides`` set (``model.n_layer=4`` -> ``n_layer``)."""
    return [key for sec, key, _ in map(parse_override, overrides) if sec == section]


def parse_override(item: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, value); value read as TOML, else kept as text."""
    name, sep, raw = item.partition("=")
    name = ALIASES.get(name.strip(), name)
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise GptforgeError(f"override '{item}' must look like section.key=value "
                            f"(e.g. train.max_steps=100)")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key.strip(), _RawText(raw, value)


class _RawText:
    """An override value plus its raw text, so a str field gets exactly what was typed."""

    def __init__(self, raw: str, parsed: Any):
        self.raw, self.parsed = raw, parsed


def merge_tree(tree: dict, update: dict, label: str) -> None:
    sections = section_types()
    for section, values in update.items():
        if section not in sections:
            raise GptforgeError(f"{label}: unknown config section '{section}'"
                                f"{_suggest(section, sections)}")
        if not isinstance(values, dict):
            raise GptforgeError(f"{label}: '{section}' must be a table like [{section}]")
        fields = {f.name: f for f in dataclasses.fields(sections[section])}
        for key, value in values.items():
            if key not in fields:
                raise GptforgeError(f"{label}: unknown config key '{section}.{key}'"
                                    f"{_suggest(key, fields, prefix=section + '.')}")
            hint = typing.get_type_hints(sections[section])[key]
            tree.setdefault(section, {})[key] = _coerce(value, hint, f"{section}.{key}", label)


def _coerce(value: Any, hint: Any, key: str, label: str) -> Any:
    if typing.get_origin(hint) is typing.Literal:
        return _choice(value, typing.get_args(hint), key, label)
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) \
        else ()
    if options:  # e.g. int | str: the first member type the value fits
        for option in options:
            try:
                return _coerce(value, option, key, label)
            except GptforgeError:
                continue
        names = " or ".join(o.__name__ for o in options)
        raw = value.raw if isinstance(value, _RawText) else value
        raise GptforgeError(f"{label}: {key} must be {names}, got {raw!r}")
    if isinstance(value, _RawText):
        if hint is str:
            return value.parsed if isinstance(value.parsed, str) else value.raw
        value = value.parsed
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise GptforgeError(f"{label}: {key} must be {hint.__name__}, got {value!r} "
                        f"({type(value).__name__})")


def _choice(value: Any, allowed: tuple, key: str, label: str) -> str:
    """A value of an enum-like setting, checked against its choices (the raw text of an
    override, so ``optim.fused=true`` is the choice "true", not a boolean)."""
    text = value.raw.strip() if isinstance(value, _RawText) else value
    if isinstance(value, _RawText) and isinstance(value.parsed, str):
        text = value.parsed
    if isinstance(text, str) and text in allowed:
        return text
    raise GptforgeError(f"{label}: {key} must be one of {', '.join(allowed)}, not {text!r}"
                        f"{_suggest(str(text), allowed, valid_list=False)}")


def _suggest(name: str, valid, prefix: str = "", valid_list: bool = True) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; valid: {', '.join(prefix + v for v in valid)}" if valid_list else ""


def section_types() -> dict[str, type]:
    return {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def build_config(tree: dict) -> Config:
    sections = {}
    for name, cls in section_types().items():
        try:
            sections[name] = cls(**tree.get(name, {}))
        except ValueError as err:
            raise GptforgeError(f"invalid config: {err}") from None
    return Config(**sections)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    lines = ["# Resolved gptforge config: every setting of this run."]
    for section, values in config_to_dict(cfg).items():
        lines.append(f"\n[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = (value.replace("\\", "\\\\").replace('"', '\\"')
                   .replace("\n", "\\n").replace("\t", "\\t"))
        return f'"{escaped}"'
    raise TypeError(f"cannot write {value!r} as TOML")


def save_config(cfg: Config, path: Path) -> None:
    atomic.write_text(path, to_toml(cfg))
