"""Reasoning steps: reward completions that lay out at least three explicit steps.

open-r1's markers ("Step N:", numbered items, bullets, First/Second/Next/Finally,), with its
defect fixed: open-r1's ``^\\d+\\.`` has no ``re.MULTILINE``, so a numbered item counts only at the
very start of the completion. Here numbered items and bullets count at the start of any line
(after optional spaces or tabs), the first line included.
"""

from __future__ import annotations

import re

from megagrpo.rewards.inputs import completion_texts

_STEP_RE = re.compile(
    r"Step \d+:|^[ \t]*\d+\.|^[ \t]*[-*]|First,|Second,|Next,|Finally,", re.MULTILINE
)

#: Number of steps that earns the full reward (open-r1's "magic number 3").
FULL_CREDIT_STEPS = 3


def count_steps(text: str) -> int:
    return len(_STEP_RE.findall(text))


def reasoning_steps_reward(completions, **columns) -> list[float]:
    """min(1, steps / 3)."""
    return [
        min(1.0, count_steps(text) / FULL_CREDIT_STEPS) for text in completion_texts(completions)
    ]
