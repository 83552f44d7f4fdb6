"""Verifiable rewards for reinforcement learning: a score for each sampled completion.

GRPO (``objectives.GroupRelativePolicy``) learns from rewards that a program can check, so no
reward model is needed ("RL with verifiable rewards", as in DeepSeekMath and Tulu 3). A reward is
a function ``(prompt, completion, example) -> float``: ``prompt`` as the record gives it (a string
or a message list), ``completion`` the sampled text without its stop token, ``example`` the whole
record. ``rl.reward`` names one:

- ``exact``: 1.0 when the completion's answer equals the record's ``answer``, else 0.0. A numeric
  reference is compared with the completion's number (GSM8K's ``#### N``, else its last number),
  other answers as normalised text; the extraction is the generative evaluation's
  (``eval/generative.py``), so training and evaluation agree on what is correct.
- ``format``: 1.0 when the completion matches the regular expression ``rl.format_pattern``.
- ``package.module:function`` or ``path/to/file.py:function``: a function of your own.

A reward function that raises, or returns something other than a finite number, does not stop
training: :func:`score` gives that rollout a reward of 0 and reports it as failed, and the
objective logs how many failed (``failed_rollouts``).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable
from pathlib import Path

from gptforge.config.schema import RlConfig
from gptforge.errors import GptforgeError
from gptforge.eval.generative import extract_answer, normalize_number

RewardFn = Callable[[object, str, dict], float]


def exact_answer(prompt, completion: str, example: dict) -> float:
    """1.0 if ``completion`` holds the record's ``answer``, or one of them when it is a list of
    accepted answers (as in ``gptforge eval`` task files; see the module docstring)."""
    answers = example["answer"] if isinstance(example["answer"], list) else [example["answer"]]
    for reference in map(str, answers):
        how = "number" if normalize_number(reference.strip()) is not None else "text"
        expected = extract_answer(reference, how)
        if expected is not None and extract_answer(completion, how) == expected:
            return 1.0
    return 0.0


def format_reward(pattern: str) -> RewardFn:
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise GptforgeError(f"rl.format_pattern: not a valid regular expression ({err})") \
            from None

    def matches(prompt, completion: str, example: dict) -> float:
        return float(regex.search(completion) is not None)

    return matches


def build_reward(cfg: RlConfig) -> RewardFn:
    """The reward function ``rl.reward`` names; a bad name is one error line."""
    spec = cfg.reward.strip()
    if spec == "exact":
        return exact_answer
    if spec == "format":
        if not cfg.format_pattern:
            raise GptforgeError("rl.reward=format needs a pattern: rl.format_pattern=REGEX")
        return format_reward(cfg.format_pattern)
    return load_function(spec)


def load_function(spec: str) -> RewardFn:
    """The function ``module.path:name`` or ``file.py:name`` names."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise GptforgeError(f"rl.reward={spec!r}: expected exact, format, module.path:function "
                            "or file.py:function")
    module = _import_file(where) if where.endswith(".py") else _import_module(where)
    function = getattr(module, name, None)
    if not callable(function):
        raise GptforgeError(f"rl.reward: {where} has no function {name!r}")
    return function


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise GptforgeError(f"rl.reward: cannot import module {name!r} ({err}); give a "
                            "module on the Python path or a file: path/to/rewards.py:function") \
            from None
    except Exception as err:
        raise GptforgeError(f"rl.reward: importing {name} failed ({_brief(err)})") from None


def _import_file(path: str):
    file = Path(path)
    if not file.is_file():
        raise GptforgeError(f"rl.reward: {file}: no such file")
    spec = importlib.util.spec_from_file_location(f"gptforge_reward_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        raise GptforgeError(f"rl.reward: loading {file} failed ({_brief(err)})") from None
    return module


def score(reward: RewardFn, prompt, completion: str, example: dict) -> tuple[float, str | None]:
    """(reward, None), or (0.0, why) when ``reward`` raised or returned no finite number."""
    try:
        value = reward(prompt, completion, example)
    except Exception as err:  # the user's code: any failure costs one rollout, not the run
        return 0.0, _brief(err)
    if isinstance(value, bool):
        return float(value), None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return 0.0, f"returned {value!r:.60}, not a finite number"
    return float(value), None


def _brief(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [""])[0][:200]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
