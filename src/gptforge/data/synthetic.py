"""A synthetic task the project generates itself: addition questions and answers.

It exercises the whole post-training path on a CPU in minutes, with an exact measure of success:
a pretraining corpus of equations (``12+7=19``), conversations for SFT (the user asks ``12+7``,
the assistant answers ``19``), preference pairs for DPO (the right answer preferred over a near
miss), and held-out problems to score a model's answers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def question(self) -> str:
        return f"{self.a}+{self.b}"

    @property
    def answer(self) -> str:
        return str(self.a + self.b)


def problems(max_operand: int = 49) -> list[Problem]:
    return [Problem(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]


def split_problems(all_problems: list[Problem], n_test: int, seed: int = 0):
    """(train, test) with ``n_test`` held-out problems never seen in any training stage."""
    shuffled = list(all_problems)
    random.Random(seed).shuffle(shuffled)
    return shuffled[n_test:], shuffled[:n_test]


def pretraining_text(train: list[Problem], repeats: int = 4, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = [f"{p.question}={p.answer}" for p in train for _ in range(repeats)]
    rng.shuffle(lines)
    return "\n".join(lines) + "\n"


def sft_records(train: list[Problem]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": p.question},
                          {"role": "assistant", "content": p.answer}]} for p in train]


def preference_records(train: list[Problem], seed: int = 0) -> list[dict]:
    """The right answer preferred to a near miss (off by 1 to 3, never negative)."""
    rng = random.Random(seed)
    records = []
    for p in train:
        wrong = p.a + p.b + rng.choice([-3, -2, -1, 1, 2, 3])
        wrong = wrong if wrong >= 0 else p.a + p.b + 1
        records.append({"prompt": p.question, "chosen": p.answer, "rejected": str(wrong)})
    return records


def chat_accuracy(model, test: list[Problem]) -> float:
    """Share of test problems a loaded model (``gptforge.load``) answers exactly, greedily."""
    correct = 0
    for p in test:
        reply = model.chat([{"role": "user", "content": p.question}], temperature=0,
                           max_new_tokens=6)
        correct += reply.strip() == p.answer
    return correct / len(test)
