"""The embedded demo's task: small additions, written as local dataset files.

Every pair a + b with 0 <= a, b <= 9 is one problem ("What is 3 + 5?", solution "8"); a fixed
seed splits them into train and test jsonl files with the columns the recipes read (``problem``,
``solution``). The answers are checked by the real accuracy reward (math-verify).
"""

from __future__ import annotations

import json
import os
import random

DEMO_SYSTEM_PROMPT = "Think in <think> </think>, then answer in <answer> </answer>."


def addition_problems() -> list[dict]:
    return [
        {"problem": f"What is {a} + {b}?", "solution": str(a + b)}
        for a in range(10)
        for b in range(10)
    ]


def write_addition_dataset(directory: str, *, test_size: int = 20, seed: int = 0) -> dict:
    """Write ``train.jsonl`` and ``test.jsonl``; returns their paths."""
    rows = addition_problems()
    random.Random(seed).shuffle(rows)
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for split, part in (("test", rows[:test_size]), ("train", rows[test_size:])):
        path = os.path.join(directory, f"{split}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for row in part:
                f.write(json.dumps(row) + "\n")
        paths[split] = path
    return paths


def formatted_answer(problem: dict) -> str:
    """The completion the warm start teaches: reasoning in <think>, the result in <answer>."""
    a, b = problem["problem"].removeprefix("What is ").removesuffix("?").split(" + ")
    return f"<think>{a}+{b}</think><answer>{problem['solution']}</answer>"
