"""The small prompt datasets the data tests write, and the environment their CLI runs get."""

from __future__ import annotations

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = [{"problem": f"What is {i} + {i}?", "solution": str(2 * i)} for i in range(20)]


def write_jsonl(path, rows, *, raw: dict[int, str] | None = None) -> str:
    """Write ``rows`` as JSON Lines; ``raw[i]`` replaces line i+1 with text as it is."""
    lines = [json.dumps(r) for r in rows]
    for i, text in (raw or {}).items():
        lines[i] = text
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def with_row(i: int, rows: list[dict] = ROWS, **changes) -> list[dict]:
    """A copy of ``rows`` with row ``i`` updated by ``changes``."""
    rows = [dict(r) for r in rows]
    rows[i].update(changes)
    return rows


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a ``megagrpo`` / ``launch/train.sh`` run from the tests: this checkout
    importable, one CPU thread per process."""
    path = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}
