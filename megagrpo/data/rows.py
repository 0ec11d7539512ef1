"""Row checks: what a prompt row must hold, and the rows dropped with ``on_bad_rows: skip``.

A row is bad when its prompt column holds neither a string nor a list of chat messages
(``{"role": str, "content": str}`` each), or when its solution is null (or not a string or a
number) while the accuracy-type rewards or the evaluation need it. With ``on_bad_rows: error``
(the default) the first bad row raises a ``DataError`` naming file, row, column and what was
expected; with ``skip`` the bad rows are dropped and counted per reason, and
``SkippedRows`` says how many, with the first few rows, once in the log and as metrics.
Prompts over ``max_prompt_length`` are counted the same way (``long_prompts``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megagrpo.data.errors import DataError

#: reason -> what it means, in the printed summary; the keys name the metrics.
REASONS = {
    "prompt_type": "prompt is not a string or a list of chat messages",
    "chat_shape": "chat messages of the wrong shape",
    "null_solution": "solution is null",
    "solution_type": "solution is not a string or a number",
    "prompt_too_long": "prompt longer than max_prompt_length",
    "verification_info": "verification_info (the code rewards' test cases) missing or malformed",
}

#: Rows named per reason in the summary.
FIRST_ROWS = 3


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def prompt_problem(value, column: str) -> tuple[str, str] | None:
    """``(reason, message)`` when ``value`` is not a usable prompt, else None."""
    if isinstance(value, str):
        return None
    if not isinstance(value, list):
        return "prompt_type", (
            f"column {column!r} holds {_kind(value)} {value!r:.40}; expected a string or a list "
            "of chat messages [{'role': ..., 'content': ...}]"
        )
    if not value:
        return "chat_shape", f"column {column!r} holds an empty list of chat messages"
    for k, m in enumerate(value):
        if not isinstance(m, dict):
            return "chat_shape", (
                f"column {column!r}: message {k} is {_kind(m)} {m!r:.40}; expected "
                "{'role': ..., 'content': ...}"
            )
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "missing" if key not in m or m[key] is None else _kind(m[key])
                return "chat_shape", (
                    f"column {column!r}: message {k} has {key!r} {got}; expected a string"
                )
    return None


def solution_problem(value, column: str) -> tuple[str, str] | None:
    """``(reason, message)`` when ``value`` cannot be a reference answer, else None."""
    if value is None:
        return "null_solution", (
            f"column {column!r} is null; expected the reference answer, which the accuracy "
            "rewards and the evaluation read"
        )
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return "solution_type", (
            f"column {column!r} holds {_kind(value)} {value!r:.40}; expected a string or a number"
        )
    return None


@dataclass
class SkippedRows:
    """Rows dropped from the prompts, per reason, with the first few named."""

    counts: dict[str, int] = field(default_factory=dict)
    first: dict[str, list[str]] = field(default_factory=dict)
    """reason -> where the first ``FIRST_ROWS`` dropped rows live."""

    def add(self, reason: str, count: int, where: list[str]) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + count
        named = self.first.setdefault(reason, [])
        named.extend(where[: FIRST_ROWS - len(named)])

    def merge(self, other: SkippedRows) -> None:
        for reason, count in other.counts.items():
            self.add(reason, count, other.first.get(reason, []))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """``3 rows: 2 solution is null (a.jsonl: row 4 ...; ...), 1 ...``"""
        parts = [
            f"{n} {REASONS.get(r, r)} (first: {'; '.join(self.first.get(r, []))})"
            for r, n in sorted(self.counts.items())
        ]
        return f"{self.total} row(s): " + ", ".join(parts)

    def metrics(self) -> dict[str, int]:
        """``data/skipped_rows`` (all reasons) and ``data/skipped_rows/<reason>``."""
        out = {"data/skipped_rows": self.total}
        out.update({f"data/skipped_rows/{r}": n for r, n in sorted(self.counts.items())})
        return out


def find_bad_rows(
    ds, prompt_column: str, solution_column: str | None, checks: dict | None = None
) -> dict[int, tuple]:
    """``row -> (reason, message)`` of every bad row of ``ds`` (the solution is checked only
    when ``solution_column`` is given; ``checks``: column -> ``fn(value, column)`` returning
    ``(reason, message)`` or None, for the columns of particular reward functions)."""
    bad: dict[int, tuple] = {}
    for i, value in enumerate(ds[prompt_column]):
        problem = prompt_problem(value, prompt_column)
        if problem:
            bad[i] = problem
    if solution_column:
        for i, value in enumerate(ds[solution_column]):
            problem = solution_problem(value, solution_column)
            if problem and i not in bad:
                bad[i] = problem
    for name, check in (checks or {}).items():
        for i, value in enumerate(ds[name]):
            problem = check(value, name)
            if problem and i not in bad:
                bad[i] = problem
    return bad


def drop_or_raise(ds, bad: dict[int, tuple], where, on_bad_rows: str, skipped: SkippedRows):
    """Raise for the first bad row (``error``), or drop them all and count them (``skip``).
    ``where(i)`` names row ``i`` of ``ds``; returns the kept rows' positions and the dataset."""
    if not bad:
        return list(range(len(ds))), ds
    first = min(bad)
    if on_bad_rows != "skip":
        more = (
            f" ({len(bad)} bad rows in all; on_bad_rows: skip drops them)" if len(bad) > 1 else ""
        )
        raise DataError(f"{where(first)}: {bad[first][1]}{more}")
    by_reason: dict[str, list[int]] = {}
    for i in sorted(bad):
        by_reason.setdefault(bad[i][0], []).append(i)
    for reason, rows in by_reason.items():
        skipped.add(reason, len(rows), [where(i) for i in rows[:FIRST_ROWS]])
    kept = [i for i in range(len(ds)) if i not in bad]
    return kept, ds.select(kept)
