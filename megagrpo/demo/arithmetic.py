"""The embedded demo's task: one-digit additions in several phrasings, written as local files.

The 100 addition facts a + b (0 <= a, b <= 9) are each asked in ``len(TEMPLATES)`` phrasings
("What is 3 + 5?", "What is the sum of 3 and 5?", "Add 3 and 5.", ...; solution "8"): 500
problems. A seeded draw holds out one phrasing of every fact as the test split (100 problems);
the other 400 are the training split. So the held-out problems are **unseen phrasings of facts
that are also trained in other phrasings**: the held-out accuracy measures how many of the 100
facts the policy has learned, in a wording it never trained on, not whether it can add numbers
it never saw. The worked solution the warm start imitates restates the problem as ``3+5`` in
``<think>`` before the answer, so a fact learned in one phrasing carries over to the others.
The files have the columns the recipes read (``problem``, ``solution``); the answers are checked
by the real accuracy reward (math-verify).
"""

from __future__ import annotations

import json
import os
import random
import re

# every template names a before b, so the restatement "a+b" is the same in each phrasing
TEMPLATES = (
    "What is {a} + {b}?",
    "What is the sum of {a} and {b}?",
    "Add {a} and {b}.",
    "Compute {a} plus {b}.",
    "{a} + {b} = ?",
)


def demo_messages(problem: str) -> list[dict]:
    """The chat prompt of one problem, as the demo recipe builds it: the question alone, no
    system prompt (the warm start teaches the format; a system prompt would double the tokens
    every step processes)."""
    return [{"role": "user", "content": problem}]


def addition_problems() -> list[dict]:
    """Every fact a + b in every phrasing: rows ``problem``, ``solution``, ordered by fact then
    template."""
    return [
        {"problem": t.format(a=a, b=b), "solution": str(a + b)}
        for a in range(10)
        for b in range(10)
        for t in TEMPLATES
    ]


def split_problems(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test): for every fact, one phrasing drawn by ``seed`` is held out; both splits
    shuffled by ``seed``."""
    rng = random.Random(seed)
    rows = addition_problems()
    n = len(TEMPLATES)
    train, test = [], []
    for i in range(0, len(rows), n):
        held = rng.randrange(n)
        for j, row in enumerate(rows[i : i + n]):
            (test if j == held else train).append(row)
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def write_addition_dataset(directory: str, *, seed: int = 0) -> dict:
    """Write ``train.jsonl`` (400 problems) and ``test.jsonl`` (100: one unseen phrasing of each
    fact) split by ``seed``; returns their paths."""
    train, test = split_problems(seed)
    return write_splits(directory, {"test": test, "train": train})


def write_splits(directory: str, splits: dict[str, list[dict]]) -> dict:
    """Write each split's rows as ``<directory>/<split>.jsonl``; returns {split: path}."""
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for split, part in splits.items():
        path = os.path.join(directory, f"{split}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for row in part:
                f.write(json.dumps(row) + "\n")
        paths[split] = path
    return paths


def operands(problem: str) -> tuple[int, int]:
    """(a, b) of a demo problem in any of its phrasings."""
    numbers = re.findall(r"\d+", problem)
    if len(numbers) != 2:
        raise ValueError(f"not a demo addition problem: {problem!r}")
    return int(numbers[0]), int(numbers[1])


def worked_solution(problem: dict) -> str:
    """The completion the warm start imitates, in open-r1's format (the newlines its format
    reward checks): the problem restated as ``a+b`` in ``<think>``, the sum boxed in
    ``<answer>``."""
    a, b = operands(problem["problem"])
    return f"<think>\n{a}+{b}\n</think>\n<answer>\n\\boxed{{{problem['solution']}}}\n</answer>"
