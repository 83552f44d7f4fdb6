"""Choosing the next token from logits, and the one definition of the settings that steer it.

:class:`SamplingSettings` is the single home of every sampling setting: its fields carry the
default, the allowed range (in the field's metadata) and the meaning (the attribute docstring),
and ``__post_init__`` is the one validation. Everything else derives from it:

- ``gptforge generate`` / ``gptforge chat`` build their options with :func:`add_sampling_options`
  and read them back with :func:`settings_from_args` (errors name the option, ``--top-p``);
- ``gptforge.load(...).generate/stream/chat(**kwargs)`` take the field names as keywords
  (:func:`settings_from_kwargs`: an unknown keyword is refused with the nearest field name);
- ``gptforge serve`` maps OpenAI's request fields onto the fields (``serve/protocol.py``), and a
  refused value becomes a 400 naming the request field;
- ``gptforge generate --interactive`` changes any field with ``/set name=value``
  (:func:`replace_setting`).

The sampling itself is pure functions of (logits, settings, generator):

- temperature: divide logits by T; T -> 0 approaches greedy (T == 0 *is* greedy here);
- top-k: keep the k most likely tokens (Fan et al., 2018);
- top-p / nucleus: keep the smallest set whose probability reaches p (Holtzman et al., 2019);
- repetition penalty: make tokens already in the context (prompt and output) less likely
  (Keskar et al., 2019, CTRL);
- frequency and presence penalties, as the OpenAI API defines them: subtract
  ``count[j] * frequency_penalty + (count[j] > 0) * presence_penalty`` from token j's logit, where
  ``count[j]`` is how often j was sampled so far in this completion (the prompt does not count).

Every setting in its documented range gives a valid token, however extreme (temperature 1e-300,
a penalty of 1e-300 or 1e300): logits are float32, so the arithmetic is arranged never to make
NaN or +inf. The largest logit is subtracted before dividing by T (the logits then lie in
[-inf, 0], and dividing can only push them towards -inf, which softmax turns into 0); T below
float32's smallest normal number (~1.2e-38), which float32 cannot divide by, is greedy, as the
limit T -> 0 is; a penalised logit saturates at float32's largest value instead of overflowing.

This module does not import torch (the functions use the methods of the tensors they are given):
the CLI builds its options from :class:`SamplingSettings` at start-up, and ``gptforge --help``
should not wait for torch to load.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gptforge.config.reference import field_docs
from gptforge.errors import GptforgeError

if TYPE_CHECKING:
    import torch

FLOAT32_TINY = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny: smallest normal
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


def _setting(default, kind: type, low=None, high=None, *, above=None):
    """A field of :class:`SamplingSettings`: its default, type (int or float) and range (``low``
    and ``high`` inclusive, ``above`` exclusive; None: unbounded)."""
    return dataclasses.field(default=default, metadata={"kind": kind, "low": low, "high": high,
                                                        "above": above})


class SettingError(GptforgeError):
    """A sampling setting out of its range: ``name`` and what is wrong (``problem``), kept apart
    so that each front end can say it in its own names (``--top-p``, the request's ``top_p``)."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name} {problem}")
        self.name, self.problem = name, problem


@dataclass(frozen=True)
class SamplingSettings:
    """How to choose each next token; validated when built (a :class:`SettingError` names the
    field)."""

    max_new_tokens: int = _setting(256, int, 0)
    """Most tokens to generate (>= 0); generation ends sooner at the end-of-text token."""
    temperature: float = _setting(1.0, float, 0.0)
    """Divides the logits (>= 0): 0 = greedy (always the most likely token), 1 = the model's own
    distribution, higher = more random."""
    top_k: int = _setting(0, int, 0)
    """Sample only among the k most likely tokens (>= 0; 0 = all tokens)."""
    top_p: float = _setting(1.0, float, 0.0, 1.0)
    """Nucleus sampling (0 to 1): sample only among the most likely tokens whose probabilities
    add up to p (1 = all tokens; the most likely token always stays)."""
    repetition_penalty: float = _setting(1.0, float, above=0.0)
    """Divides the positive and multiplies the negative logits of tokens already in the prompt or
    output (> 0; 1 = off, > 1 discourages repeats; CTRL, Keskar et al. 2019)."""
    frequency_penalty: float = _setting(0.0, float, -2.0, 2.0)
    """Times the number of times a token was already generated, subtracted from its logit (-2 to
    2; 0 = off, > 0 discourages repeats; OpenAI's definition: the prompt does not count)."""
    presence_penalty: float = _setting(0.0, float, -2.0, 2.0)
    """Subtracted from the logit of every token already generated at least once (-2 to 2;
    0 = off, > 0 encourages new tokens; OpenAI's definition: the prompt does not count)."""
    seed: int | None = _setting(None, int, *SEED_RANGE)
    """Seed of the sampling's random numbers: the same seed and settings give the same text
    (none = different every time)."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            problem = range_problem(field, getattr(self, field.name))
            if problem:
                raise SettingError(field.name, problem)


def range_problem(field: dataclasses.Field, value) -> str | None:
    """What is wrong with ``value`` for a :class:`SamplingSettings` field, or None."""
    meta = field.metadata
    if value is None and field.default is None:
        return None
    if meta["kind"] is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, got {brief_repr(value)}"
    elif not is_finite_number(value):
        return f"must be a finite number, got {brief_repr(value)}"
    low, high, above = meta["low"], meta["high"], meta["above"]
    if (low is not None and value < low) or (high is not None and value > high) or \
            (above is not None and value <= above):
        bounds = [f">= {_number(low)}" if low is not None else None,
                  f"> {_number(above)}" if above is not None else None,
                  f"<= {_number(high)}" if high is not None else None]
        return f"must be {' and '.join(b for b in bounds if b)}, got {brief_repr(value)}"
    return None


def _number(bound: float) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


def is_finite_number(value) -> bool:
    """Whether ``value`` is a real number a float can hold: not NaN or infinite, not a bool, and
    not an integer too large for a float (``math.isfinite`` raises on those)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def brief_repr(value) -> str:
    """``value`` for an error message: a 400-digit integer is not worth printing whole."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def setting_fields() -> dict[str, dataclasses.Field]:
    return {field.name: field for field in dataclasses.fields(SamplingSettings)}


def settings_from_kwargs(**kwargs) -> SamplingSettings:
    """The settings of the Python API's keywords; an unknown keyword is refused by name."""
    fields = setting_fields()
    for name in kwargs:
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else \
                f"; the settings are {', '.join(fields)}"
            raise GptforgeError(f"unknown sampling setting {name!r}{hint}")
    return SamplingSettings(**kwargs)


def add_sampling_options(parser: argparse.ArgumentParser, **defaults) -> None:
    """One ``--option`` per :class:`SamplingSettings` field, its help the field's docstring.

    ``defaults`` replace the dataclass's for this command (``temperature=0.8``); a default of
    None leaves the choice to the command (shown as "default: automatic")."""
    docs = field_docs(SamplingSettings)
    for name, field in setting_fields().items():
        default = defaults.get(name, field.default)
        shown = "none" if field.default is None else "automatic" if default is None else default
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=default,
                            type=field.metadata["kind"],
                            metavar="N" if field.metadata["kind"] is int else "X",
                            help=f"{docs[name]} (default: {shown})")


def settings_from_args(args: argparse.Namespace) -> SamplingSettings:
    """The settings of the options :func:`add_sampling_options` added, refused in the options'
    names ("--top-p must be a finite number, got nan"); an option left at None takes the
    dataclass's default."""
    values = {name: getattr(args, name) for name in setting_fields()}
    try:
        return SamplingSettings(**{k: v for k, v in values.items() if v is not None})
    except SettingError as err:
        raise GptforgeError(f"--{err.name.replace('_', '-')} {err.problem}") from None


def replace_setting(settings: SamplingSettings, name: str, text: str) -> SamplingSettings:
    """``settings`` with field ``name`` set from ``text`` ("0.7", "40", "none" for the seed)."""
    field = setting_fields().get(name)
    if field is None:
        close = difflib.get_close_matches(name, list(setting_fields()), n=1, cutoff=0.5)
        raise GptforgeError(f"unknown setting {name!r}" +
                            (f"; did you mean {close[0]}?" if close else ""))
    if text.lower() == "none" and field.default is None:
        return dataclasses.replace(settings, **{name: None})
    try:
        value = field.metadata["kind"](text)
    except ValueError:
        kind = "an integer" if field.metadata["kind"] is int else "a number"
        raise SettingError(name, f"must be {kind}, got {text!r}") from None
    return dataclasses.replace(settings, **{name: value})


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of tokens in ``seen`` (B, n) by ``penalty``."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    # Keep the factor a normal float32 (1e-300 would round to 0 there and 0 * inf is NaN), and
    # let the products saturate rather than reach +-inf (an inf - inf in softmax is NaN).
    penalty = float(min(max(penalty, FLOAT32_TINY), FLOAT32_MAX))  # ints of any size too
    picked = logits.gather(1, seen)
    picked = (picked / penalty).where(picked > 0, picked * penalty)
    return logits.scatter(1, seen, picked.clamp(-FLOAT32_MAX, FLOAT32_MAX))


def apply_frequency_presence_penalty(logits: torch.Tensor, counts: torch.Tensor,
                                     frequency: float, presence: float) -> torch.Tensor:
    """OpenAI's penalties: ``logits - counts * frequency - (counts > 0) * presence``, where
    ``counts`` (B, V) holds how often each token was generated so far in each row."""
    if frequency == 0 and presence == 0:
        return logits
    # Both terms are at most 2 * max_new_tokens: no float32 logit can overflow by them.
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = logits.topk(k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token if the tokens before it already reach p; the most likely token always stays,
    # even for p <= 0 (otherwise every logit would be -inf and the softmax NaN).
    drop = probs.cumsum(dim=-1) - probs >= p
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return logits.scatter(1, order, sorted_logits)


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids (B,) drawn from logits (B, V); ``temperature`` below ~1.2e-38 is greedy."""
    if temperature < FLOAT32_TINY:
        return logits.argmax(dim=-1)
    logits = logits.float().clamp(max=FLOAT32_MAX)  # +inf would make inf - inf = NaN below
    # (B, V) in [-inf, 0]: dividing by a tiny T cannot overflow to +inf, only to -inf (a
    # probability of 0); T above float32's range would turn -inf / inf into NaN, so it is capped.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / float(min(temperature, FLOAT32_MAX))
    probs = filter_top_p(filter_top_k(logits, top_k), top_p).softmax(dim=-1)
    return probs.multinomial(1, generator=generator).squeeze(1)
