"""``RewardScores`` (the [N, K] result of scoring one step) and the in-process serial scorer.

Legend: N = completions of the step (group-major), K = reward functions.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from megagrpo.algorithms.advantages import weighted_rewards
from megagrpo.rewards.calls import (
    CRASH,
    ERROR,
    NONE,
    SCORED,
    TIMEOUT,
    call_one,
    check_value,
    sample_rows,
)


@dataclass
class RewardScores:
    """Every function's score of every completion, and how the scoring went."""

    rewards_nk: torch.Tensor
    """float64 [N, K]; NaN where the function answered None, raised, timed out or crashed."""
    status_nk: torch.Tensor
    """int8 [N, K]: ``calls.SCORED``, ``NONE``, ``ERROR``, ``TIMEOUT`` or ``CRASH``."""
    names: list[str]
    weights_k: torch.Tensor
    """float64 [K]: the reward weights."""
    seconds: float = 0.0
    """Wall time of the scoring."""
    restarts: int = 0
    """Worker processes replaced during the scoring."""
    error_messages: list[str] = field(default_factory=list)
    """The first few errors, as '<function> on sample <i>: <message>'."""

    def count(self, status: int) -> int:
        return int((self.status_nk == status).sum())

    @property
    def timeouts(self) -> int:
        return self.count(TIMEOUT)

    @property
    def errors(self) -> int:
        return self.count(ERROR)

    @property
    def crashes(self) -> int:
        return self.count(CRASH)

    @property
    def nones(self) -> int:
        return self.count(NONE)

    def total_n(self) -> torch.Tensor:
        """Weighted sum over functions ignoring NaN; NaN where no function scored (TRL's)."""
        return weighted_rewards(self.rewards_nk, self.weights_k)

    @classmethod
    def concat(cls, parts: list[RewardScores]) -> RewardScores:
        """The scores of several batches (the same functions), one after the other."""
        first = parts[0]
        if any(p.names != first.names for p in parts):
            raise ValueError(f"scores of different functions: {[p.names for p in parts]}")
        if len(parts) == 1:
            return first
        return cls(
            rewards_nk=torch.cat([p.rewards_nk for p in parts]),
            status_nk=torch.cat([p.status_nk for p in parts]),
            names=list(first.names),
            weights_k=first.weights_k,
            seconds=sum(p.seconds for p in parts),
            restarts=sum(p.restarts for p in parts),
            error_messages=[m for p in parts for m in p.error_messages][:MAX_ERROR_MESSAGES],
        )

    def by_name(self) -> dict[str, list[float | None]]:
        """Each function's scores as a list (None where NaN), for tables and logs."""
        return {
            name: [None if math.isnan(v) else v for v in self.rewards_nk[:, k].tolist()]
            for k, name in enumerate(self.names)
        }


MAX_ERROR_MESSAGES = 20


def apply_combine(functions, values_nk, status_nk, columns: dict, group_size, messages: list):
    """Second stage of functions with a ``combine`` (Kimi's len): in place, on lists."""
    for k, fn in enumerate(functions):
        if fn.combine is None:
            continue
        stage = [None if math.isnan(row[k]) else row[k] for row in values_nk]
        try:
            final = fn.finish(stage, columns, group_size)
            statuses, finals, err = check_value(final, len(stage))
        except Exception as e:  # noqa: BLE001 - reported, the column scores NaN
            statuses, finals, err = [ERROR] * len(stage), [math.nan] * len(stage), repr(e)
        if err and len(messages) < MAX_ERROR_MESSAGES:
            messages.append(f"{fn.name} (group stage): {err}")
        for i, (st, v) in enumerate(zip(statuses, finals)):
            if status_nk[i][k] == SCORED:  # keep why the first stage failed, if it did
                status_nk[i][k] = st
            values_nk[i][k] = v if status_nk[i][k] == SCORED else math.nan


def make_scores(functions, values_nk, status_nk, seconds, restarts, messages) -> RewardScores:
    k = len(functions)
    return RewardScores(
        rewards_nk=torch.tensor(values_nk, dtype=torch.float64).reshape(-1, k),
        status_nk=torch.tensor(status_nk, dtype=torch.int8).reshape(-1, k),
        names=[f.name for f in functions],
        weights_k=torch.tensor([f.weight for f in functions], dtype=torch.float64),
        seconds=seconds,
        restarts=restarts,
        error_messages=messages,
    )


def check_batch(completions, columns: dict, num_generations: int | None) -> list[dict]:
    n = len(completions)
    if num_generations is not None and (num_generations < 1 or n % num_generations):
        raise ValueError(
            f"{n} completions are not whole groups of num_generations={num_generations}"
        )
    return sample_rows(columns, n)


def score_serial(functions, completions, columns: dict, num_generations: int | None = None):
    """Score in this process, each function on the whole batch: no timeouts, no isolation.

    A function that raises on the batch is re-run sample by sample so the error is attributed.
    """
    start = time.perf_counter()
    rows = check_batch(completions, columns, num_generations)
    n, k = len(completions), len(functions)
    values = [[math.nan] * k for _ in range(n)]
    status = [[SCORED] * k for _ in range(n)]
    messages: list[str] = []
    for j, fn in enumerate(functions):
        call = fn.load()
        try:
            statuses, vals, err = check_value(call(list(completions), **columns), n)
            if err:
                raise ValueError(err)
        except Exception as e:  # noqa: BLE001 - retried per sample to find the culprit
            if len(messages) < MAX_ERROR_MESSAGES:
                messages.append(f"{fn.name} on the whole batch: {e}; retried sample by sample")
            statuses, vals = [], []
            for i in range(n):
                st, v, err = call_one(call, completions[i], rows[i])
                statuses.append(st)
                vals.append(v)
                if err and len(messages) < MAX_ERROR_MESSAGES:
                    messages.append(f"{fn.name} on sample {i}: {err}")
        for i in range(n):
            values[i][j], status[i][j] = vals[i], statuses[i]
    apply_combine(functions, values, status, columns, num_generations, messages)
    return make_scores(functions, values, status, time.perf_counter() - start, 0, messages)
