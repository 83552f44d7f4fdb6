"""The search space of a sweep: ``--param section.key=SPEC`` parsed into Optuna distributions.

SPEC is ``log:LO:HI`` (log-uniform), ``LO:HI`` (uniform; integers where the config field is an
integer), ``int:LO:HI`` (integers), or ``a,b,c`` (a choice of values, each read exactly as a
``section.key=value`` override would be). Every key and bound is checked through the config loader
before any trial runs, so a typo fails at once with the nearest valid key, a value of the wrong type
with the expected type, and an empty range with what to change.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from gptforge.config.loader import load_config, section_types
from gptforge.errors import GptforgeError

SET_BY_SWEEP = ("train.max_steps", "train.out_dir")  # --budget and SWEEP_DIR/trial-N decide them
MAX_GRID_INTS = 1000  # an int range a grid enumerates; beyond this it is surely a mistake


@dataclass(frozen=True)
class Param:
    """One swept config key and the values a trial may give it."""

    key: str  # "optim.lr"
    spec: str  # as typed after '=': "log:1e-4:3e-3"
    distribution: BaseDistribution

    @property
    def is_log(self) -> bool:
        return bool(getattr(self.distribution, "log", False))

    def override(self, value) -> str:
        """The ``section.key=value`` override that gives a trial this value."""
        return f"{self.key}={value!r}" if isinstance(value, float) else f"{self.key}={value}"

    def show(self, value) -> str:
        """``key=value`` for people: floats to 4 significant digits."""
        return f"{self.key}={value:.4g}" if isinstance(value, float) else f"{self.key}={value}"

    def grid_values(self) -> list:
        """Every value, for a grid; only choices and integer ranges have a finite list."""
        dist = self.distribution
        if isinstance(dist, CategoricalDistribution):
            return list(dist.choices)
        if isinstance(dist, IntDistribution) and not dist.log \
                and dist.high - dist.low < MAX_GRID_INTS:
            return list(range(dist.low, dist.high + 1))
        raise GptforgeError(f"--param {self.key}={self.spec}: --sampler grid needs a list of "
                            "values (a,b,c) or an int:LO:HI range; use --sampler tpe or random "
                            "for continuous ranges")


def parse_params(items: list[str], config: str | None, overrides: list[str]) -> list[Param]:
    """The ``--param`` options, each validated against the config they will override."""
    if not items:
        raise GptforgeError("name at least one --param section.key=SPEC to sweep, "
                            "e.g. --param optim.lr=log:1e-4:3e-3")
    params = [parse_param(item, config, overrides) for item in items]
    keys = [p.key for p in params]
    repeated = next((k for k in keys if keys.count(k) > 1), None)
    if repeated:
        raise GptforgeError(f"--param {repeated} is given twice; give it once")
    return params


def parse_param(item: str, config: str | None, overrides: list[str]) -> Param:
    key, sep, spec = (part.strip() for part in item.partition("="))
    if not sep or not spec or "." not in key:
        raise GptforgeError(f"--param '{item}' must look like section.key=SPEC "
                            "(log:LO:HI, LO:HI, int:LO:HI or a,b,c)")
    if key in SET_BY_SWEEP:
        raise GptforgeError(f"--param {key}: the sweep sets it for each trial (--budget, --out); "
                            "sweep other keys")

    def check(value: str) -> None:  # through the loader: 'did you mean', types, field checks
        load_config(config, [*overrides, f"{key}={value}"])

    if "," in spec:
        choices = tuple(v.strip() for v in spec.split(","))
        if any(not v for v in choices) or len(set(choices)) < len(choices):
            raise GptforgeError(f"--param {item}: values must be distinct and not empty")
        for value in choices:
            check(value)
        return Param(key, spec, CategoricalDistribution(choices))
    kind, bounds = _split_range(item, spec)
    for bound in bounds:
        check(bound)
    return Param(key, spec, _range(item, kind, bounds, _field_type(key)))


def _split_range(item: str, spec: str) -> tuple[str, tuple[str, str]]:
    """("log" | "int" | "", (LO, HI)) of a range spec."""
    parts = spec.split(":")
    kind = parts[0] if parts[0] in ("log", "int") else ""
    bounds = parts[1:] if kind else parts
    if len(bounds) != 2:
        raise GptforgeError(f"--param {item}: a range is LO:HI, log:LO:HI or int:LO:HI; a choice "
                            "of values is a,b,c")
    return kind, (bounds[0], bounds[1])


def _field_type(key: str):
    section, _, name = key.partition(".")
    return typing.get_type_hints(section_types()[section])[name]


def _range(item: str, kind: str, bounds: tuple[str, str], hint) -> BaseDistribution:
    accepts = typing.get_args(hint) or (hint,)
    integral = kind == "int" or hint is int or (
        int in accepts and float not in accepts and all(_is_int(b) for b in bounds))
    try:
        low, high = (int(b) for b in bounds) if integral else (float(b) for b in bounds)
    except ValueError:
        what = "integers" if integral else "numbers"
        raise GptforgeError(f"--param {item}: the bounds must be {what}") from None
    if low >= high:
        raise GptforgeError(f"--param {item}: LO must be below HI; got {low} and {high}")
    if kind == "log" and low <= 0:
        raise GptforgeError(f"--param {item}: a log range needs LO > 0; got {low}")
    if integral:
        return IntDistribution(low, high, log=kind == "log")
    return FloatDistribution(low, high, log=kind == "log")


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True
