"""One reward call on one sample, and the status codes that say how it ended.

Shared by the serial scorer (``scores.score_serial``) and the pool's worker processes; imports
nothing heavy so that workers start fast.
"""

from __future__ import annotations

import math
import traceback

PENDING, SCORED, NONE, ERROR, TIMEOUT, CRASH = 0, 1, 2, 3, 4, 5
STATUS_NAMES = {
    PENDING: "pending",
    SCORED: "scored",
    NONE: "none",  # the function answered None ("cannot score")
    ERROR: "error",  # it raised, or answered something that is not a number or None
    TIMEOUT: "timeout",  # it ran past the timeout and its worker was killed
    CRASH: "crash",  # its worker died under it (segfault, os._exit, OOM kill)
}


def sample_rows(columns: dict, n: int) -> list[dict]:
    """Per-sample column dicts from column lists, each checked to hold ``n`` entries."""
    if not isinstance(columns, dict):
        raise TypeError(f"columns must be a dict of column name -> list, got {type(columns)}")
    lists = {}
    for name, values in columns.items():
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
            raise ValueError(
                f"column {name!r} must be a list with one entry per completion, got "
                f"{type(values).__name__}"
            )
        if len(values) != n:
            raise ValueError(f"column {name!r} has {len(values)} entries for {n} completions")
        lists[name] = values
    return [{name: values[i] for name, values in lists.items()} for i in range(n)]


def check_value(out, batch: int) -> tuple[list[int], list[float], str | None]:
    """Statuses and values of a function's answer for ``batch`` samples, or an error message."""
    if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__"):
        return [ERROR] * batch, [math.nan] * batch, f"returned {type(out).__name__}, not a list"
    if len(out) != batch:
        return [ERROR] * batch, [math.nan] * batch, f"returned {len(out)} values for {batch}"
    statuses, values, err = [], [], None
    for v in out:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            statuses.append(NONE)
            values.append(math.nan)
            continue
        try:
            if isinstance(v, (str, bytes)):
                raise TypeError
            f = float(v)
        except (TypeError, ValueError):
            f = math.nan
        if not math.isfinite(f):
            statuses.append(ERROR)
            values.append(math.nan)
            err = err or f"returned {v!r:.40}, not a finite number or None"
        else:
            statuses.append(SCORED)
            values.append(f)
    return statuses, values, err


def call_one(fn, completion, row: dict) -> tuple[int, float, str | None]:
    """(status, value, error message) of ``fn`` on one sample."""
    try:
        out = fn([completion], **{name: [value] for name, value in row.items()})
    except Exception as e:  # a reward function's failure is data, not a crash of the caller
        tb = traceback.extract_tb(e.__traceback__)
        where = f" at {tb[-1].filename}:{tb[-1].lineno}" if tb else ""
        return ERROR, math.nan, f"{type(e).__name__}: {e}{where}"
    statuses, values, err = check_value(out, 1)
    return statuses[0], values[0], err
