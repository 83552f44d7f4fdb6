"""Generative tasks: the model writes an answer, which is extracted, normalised and compared.

Multiple-choice tasks only ask which of a few given texts the model finds likeliest. A generative
task asks the model to *produce* the answer, as GSM8K does: the model continues the prompt until
a stop sequence (or end of text, or ``max_new_tokens``), the answer is extracted from what it
wrote and compared with the reference after normalisation (exact match).

Answer extraction (``extract``):

- ``"number"``: the number after GSM8K's ``#### `` marker if the text has one, else the last
  number in the text (lm-evaluation-harness's "strict" and "flexible" GSM8K filters in one).
  Numbers are compared as values: ``"1,000"``, ``"$1000"`` and ``"1000.00"`` are equal.
- ``"text"``: the whole text, with whitespace collapsed, a trailing period dropped, thousands
  commas inside numbers removed and case folded.

pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", sec. 2.1): draw
``n >= k`` samples per problem, count the ``c`` correct ones, and estimate the chance that at
least one of ``k`` samples is correct as ``1 - C(n - c, k) / C(n, k)``, averaged over problems.
It is unbiased, unlike ``1 - (1 - c/n)^k``, and computed as a product to avoid huge binomials.
``exact_match`` is the mean of ``c / n`` (pass@1).

Chat models (``chat=True``): each prompt becomes a user turn, rendered with the model's chat
template (``tokenizer/chat_template.py``) through the same code ``gptforge chat`` uses; few-shot
examples become earlier user/assistant turns. Generation goes through the inference engine
(``inference/engine.py``); the ``n`` samples of one prompt are decoded as one batch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from gptforge.errors import GptforgeError
from gptforge.eval.text_metrics import text_metrics
from gptforge.inference.chat import fit_conversation, prompt_budget
from gptforge.inference.sampling import SamplingSettings
from gptforge.inference.textgen import TextGenerator
from gptforge.runtime.device import Precision
from gptforge.tokenizer.chat_template import stop_ids as chat_stop_ids

EXTRACTORS = ("number", "text")
GSM8K_MARKER = re.compile(r"####\s*(-?[$\d][\d,]*(?:\.\d+)?)")
NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
SAMPLES_KEPT = 3  # generations shown in the results, so a user sees what the model writes


@dataclass(frozen=True)
class GenExample:
    prompt: str
    answers: tuple[str, ...]  # accepted answers: references for exact match, BLEU and chrF
    where: str = ""


@dataclass(frozen=True)
class GenSettings:
    num_samples: int = 1
    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = 0
    stop: tuple[str, ...] = ()
    extract: str = "text"
    chat: bool = False
    pass_k: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.extract not in EXTRACTORS:
            raise GptforgeError(f"unknown answer extraction '{self.extract}' (choose one of: "
                                f"{', '.join(EXTRACTORS)})")
        if self.num_samples > 1 and self.temperature <= 0:
            raise GptforgeError(f"{self.num_samples} samples at temperature 0 would all be the "
                                "same greedy answer; give a --temperature above 0 (e.g. 0.8)")
        too_big = [k for k in self.pass_k if not 1 <= k <= self.num_samples]
        if too_big:
            raise GptforgeError(f"pass@{too_big[0]} needs at least {too_big[0]} samples per "
                                f"problem; raise --num-samples to {max(too_big)} or more")


# --------------------------------------------------------------------------- answers


def normalize_number(text: str) -> str | None:
    """A number's canonical spelling (``"$1,000.00"`` -> ``"1000"``), or None if not a number."""
    cleaned = text.replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return str(int(value)) if value.is_integer() else repr(value)


def normalize_text(text: str) -> str:
    text = THOUSANDS_COMMA.sub("", " ".join(text.split()))
    return text.rstrip(".").strip().casefold()


def extract_answer(text: str, how: str) -> str | None:
    """The answer in a generated (or reference) ``text``; None when there is none."""
    if how == "text":
        return normalize_text(text)
    marked = GSM8K_MARKER.findall(text)
    numbers = marked or NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that at least one of ``k`` of the ``n`` samples (``c`` correct) is correct."""
    if n - c < k:
        return 1.0
    # 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Shot:
    prompt: str
    answer: str  # the text the model should write after the prompt


def plain_prompt(example: GenExample, shots: Sequence[Shot]) -> str:
    """Few-shot examples as ``prompt + " " + answer`` blocks separated by a blank line, then the
    prompt (lm-evaluation-harness's layout)."""
    blocks = [f"{s.prompt} {s.answer.lstrip()}" for s in shots]
    return "\n\n".join([*blocks, example.prompt])


def chat_messages(example: GenExample, shots: Sequence[Shot]) -> list[dict]:
    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": shot.prompt},
                     {"role": "assistant", "content": shot.answer.strip()}]
    return messages + [{"role": "user", "content": example.prompt}]


# --------------------------------------------------------------------------- generation


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to (without) the first stop sequence, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def generate_texts(generator: TextGenerator, prompt_ids: list[int], settings: GenSettings, *,
                   stop_ids: Sequence[int], banned_ids: Sequence[int] = (),
                   seed: int | None = None) -> list[str]:
    """``settings.num_samples`` continuations of ``prompt_ids``, each cut at its first stop id
    or stop sequence; generation ends once every sample has stopped."""
    n = settings.num_samples
    sampling = SamplingSettings(max_new_tokens=settings.max_new_tokens,
                                temperature=settings.temperature, seed=seed)
    steps = generator.engine.generate(prompt_ids, sampling, num_samples=n, stop_ids=stop_ids,
                                      banned_ids=banned_ids)
    rows: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    for step in steps:
        for i, token in enumerate(step.tolist()):
            if done[i]:
                continue
            if token in stop_ids:
                done[i] = True
                continue
            rows[i].append(token)
            if settings.stop:  # decoding the row so far: a stop can span tokens
                done[i] = cut_at_stop(generator.tokenizer.decode(rows[i]), settings.stop)[1]
        if all(done):
            steps.close()
            break
    return [cut_at_stop(generator.tokenizer.decode(r), settings.stop)[0] for r in rows]


def prompt_ids_of(generator: TextGenerator, example: GenExample, shots: Sequence[Shot],
                  settings: GenSettings) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, stop ids, banned ids) of ``example``: a chat prompt is fitted to the context
    by dropping the oldest shots; a plain one loses tokens from the left."""
    tokenizer = generator.tokenizer
    budget = prompt_budget(generator.model.config.block_size, settings.max_new_tokens)
    try:
        if settings.chat:
            template = generator.chat_template  # the one the model was fine-tuned with
            _, ids = fit_conversation(tokenizer, chat_messages(example, shots), budget, template)
            stops = chat_stop_ids(tokenizer, template)
            return ids, stops, sorted(set(tokenizer.special_tokens.values()) - set(stops))
        ids = generator.encode_prompt(plain_prompt(example, shots))
    except GptforgeError as err:
        raise GptforgeError(f"{example.where}: {err}") from None
    return ids[-budget:], [tokenizer.eos_id], []


# --------------------------------------------------------------------------- scoring


@dataclass
class GenResult:
    examples: int
    num_samples: int
    exact_match: float
    exact_match_stderr: float
    pass_at: dict[str, float]
    metrics: dict[str, float | None]  # bleu, chrf, distinct_1, distinct_2, repetition_4
    samples: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"examples": self.examples, "num_samples": self.num_samples,
                "exact_match": self.exact_match, "exact_match_stderr": self.exact_match_stderr,
                **{f"pass@{k}": v for k, v in self.pass_at.items()}, **self.metrics,
                "samples": self.samples}


def score_example(example: GenExample, texts: Sequence[str], how: str) -> list[bool]:
    gold = {extract_answer(a, how) for a in example.answers} - {None}
    return [extract_answer(t, how) in gold for t in texts]


def evaluate_generative(model: torch.nn.Module, tokenizer, examples: Sequence[GenExample],
                        shots: Sequence[Shot], settings: GenSettings, *, precision: Precision,
                        progress: bool = False) -> GenResult:
    """Exact match, pass@k and text metrics of ``model``'s answers to ``examples``."""
    from tqdm import tqdm

    if not examples:
        raise GptforgeError("no examples to evaluate")
    generator = TextGenerator(model, tokenizer)
    outputs: list[list[str]] = []
    fractions, pass_sums = [], dict.fromkeys(settings.pass_k, 0.0)
    samples = []
    for index, example in enumerate(tqdm(examples, disable=not progress, leave=False)):
        ids, stops, banned = prompt_ids_of(generator, example, shots, settings)
        seed = None if settings.seed is None else settings.seed + index
        with precision.autocast():
            texts = generate_texts(generator, ids, settings, stop_ids=stops, banned_ids=banned,
                                   seed=seed)
        correct = score_example(example, texts, settings.extract)
        outputs.append(texts)
        fractions.append(sum(correct) / len(correct))
        for k in pass_sums:
            pass_sums[k] += pass_at_k(len(correct), sum(correct), k)
        if len(samples) < SAMPLES_KEPT:
            samples.append({"where": example.where, "output": texts[0],
                            "extracted": extract_answer(texts[0], settings.extract),
                            "answers": list(example.answers), "correct": correct[0]})
    n = len(examples)
    em = sum(fractions) / n
    return GenResult(n, settings.num_samples, em, math.sqrt(em * (1 - em) / n),
                     {str(k): s / n for k, s in pass_sums.items()},
                     text_metrics(outputs, [list(e.answers) for e in examples]), samples)
