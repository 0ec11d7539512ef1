"""A small code task for the code rewards, written as local dataset files (no hub).

Each problem asks for a Python program that reads stdin and prints an answer; its row has the
columns open-r1's code datasets have: ``problem`` (the prompt), ``solution`` (a reference program
in a fenced block, as ``gold_standard_solution``) and ``verification_info`` (``{"language":
"python", "test_cases": [{"input", "output", "type"}]}``), with test cases computed here from the
reference functions. A fixed seed splits them into train and test jsonl files.
"""

from __future__ import annotations

import random

from megagrpo.demo.arithmetic import write_splits

CODE_SYSTEM_PROMPT = "Think in <think> </think>, answer in <answer> </answer>: a ```python program."

# (task text, reference program, python function computing the expected output from the input)
_TASKS = [
    ("Read two integers a and b on one line and print a + b.",
     "a, b = map(int, input().split())\nprint(a + b)",
     lambda a, b: a + b),
    ("Read two integers a and b on one line and print a - b.",
     "a, b = map(int, input().split())\nprint(a - b)",
     lambda a, b: a - b),
    ("Read two integers a and b on one line and print a * b.",
     "a, b = map(int, input().split())\nprint(a * b)",
     lambda a, b: a * b),
    ("Read two integers a and b on one line and print the larger one.",
     "a, b = map(int, input().split())\nprint(max(a, b))",
     lambda a, b: max(a, b)),
    ("Read two integers a and b on one line and print the smaller one.",
     "a, b = map(int, input().split())\nprint(min(a, b))",
     lambda a, b: min(a, b)),
    ("Read two integers a and b on one line and print their sum and their product on two lines.",
     "a, b = map(int, input().split())\nprint(a + b)\nprint(a * b)",
     lambda a, b: f"{a + b}\n{a * b}"),
]  # fmt: skip

_INPUTS = [(1, 2), (7, 3), (0, 9), (12, 5)]


def code_problems() -> list[dict]:
    rows = []
    for text, program, fn in _TASKS:
        cases = [
            {"input": f"{a} {b}\n", "output": f"{fn(a, b)}\n", "type": "stdin_stdout"}
            for a, b in _INPUTS
        ]
        rows.append(
            {
                "problem": text,
                "solution": f"```python\n{program}\n```",
                "verification_info": {"language": "python", "test_cases": cases},
            }
        )
    return rows


def write_code_dataset(directory: str, *, test_size: int = 2, seed: int = 0) -> dict:
    """Write ``train.jsonl`` and ``test.jsonl`` of the code task; returns their paths."""
    rows = code_problems()
    random.Random(seed).shuffle(rows)
    return write_splits(directory, {"test": rows[:test_size], "train": rows[test_size:]})


def formatted_code_answer(row: dict) -> str:
    """A completion in the R1 format whose answer is the row's reference program."""
    return f"<think>\nread, compute, print\n</think>\n<answer>\n{row['solution']}\n</answer>"
