"""Worked solutions of the demo's additions with reasoning of variable length.

The realistic benchmark workload (``demo/realistic_workload.py``) needs completions whose lengths
spread as an RL policy's do: a few answers with no reasoning, most with a little, a tail that
runs into ``max_completion_length``. Its warm start imitates these targets: the demo's worked
solution (``arithmetic.worked_solution``) with ``lines`` extra ``check a+b`` lines in ``<think>``
(10 tokens each with the demo's byte-level tokenizer), ``lines`` drawn from a truncated geometric
distribution (a constant chance to stop after every line, so a sampled policy runs past the
longest target now and then), or, with probability ``no_think``, the answer block alone (14 to
15 tokens with EOS; the format reward scores it 0). The answer is the same in every variant.
"""

from __future__ import annotations

import dataclasses
import random

from megagrpo.demo.arithmetic import operands, worked_solution


@dataclasses.dataclass(frozen=True)
class ReasoningLengths:
    """How many ``check`` lines a target's ``<think>`` holds."""

    mean_lines: float = 10.0  # mean of the geometric draw before truncation
    max_lines: int = 23  # truncation: 23 lines make a target of 252-253 tokens with EOS
    no_think: float = 0.1  # chance of the answer block alone

    def __post_init__(self):
        if self.mean_lines < 0 or self.max_lines < 0 or not 0 <= self.no_think < 1:
            raise ValueError(f"reasoning lengths need sizes >= 0 and 0 <= no_think < 1: {self}")

    def draw(self, rng: random.Random) -> int | None:
        """A number of check lines, or None for no reasoning."""
        if rng.random() < self.no_think:
            return None
        stop = 1.0 / (1.0 + self.mean_lines)
        lines = 0
        while lines < self.max_lines and rng.random() >= stop:
            lines += 1
        return lines


def reasoning_solution(problem: dict, lines: int | None) -> str:
    """The worked solution with ``lines`` check lines (0: the demo's own; None: no ``<think>``)."""
    solution = worked_solution(problem)
    if lines is None:
        return solution[solution.index("<answer>") :]
    a, b = operands(problem["problem"])
    return solution.replace(f"\n{a}+{b}\n", f"\n{a}+{b}\n" + f"check {a}+{b}\n" * lines, 1)


def reasoning_targets(
    rows: list[dict], lengths: ReasoningLengths, rng: random.Random, variants: int = 1
) -> tuple[list[dict], list[str]]:
    """(rows, targets): every row ``variants`` times, each with its own drawn length."""
    out_rows = [row for row in rows for _ in range(variants)]
    return out_rows, [reasoning_solution(row, lengths.draw(rng)) for row in out_rows]
