"""The completions of a logging step as a table: one row per completion.

Written as ``<output_dir>/completions/step_<N>.parquet`` with the columns ``step``, ``prompt``,
``completion``, ``reward``, ``advantage``, one column per reward function (NaN where it could not
score) and ``finish_reason``; with wandb on, the same rows go to a ``completions`` table.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence


def write_completions_table(
    output_dir: str,
    step: int,
    prompts: Sequence[str],
    completions: Sequence[str],
    rewards_by_fn: dict[str, Sequence[float | None]],
    rewards: Sequence[float],
    advantages: Sequence[float],
    finish_reasons: Sequence[str] | None = None,
) -> str:
    """Write the table; returns its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(completions)
    columns = {
        "prompt": prompts,
        "completion": completions,
        "reward": rewards,
        "advantage": advantages,
        **{f"rewards/{k}": v for k, v in rewards_by_fn.items()},
    }
    for name, values in columns.items():
        if len(values) != n:
            raise ValueError(
                f"completions table: column '{name}' has {len(values)} rows, expected {n}"
            )
    data = {"step": [step] * n, "prompt": list(prompts), "completion": list(completions)}
    for name in ("reward", "advantage", *[f"rewards/{k}" for k in rewards_by_fn]):
        data[name] = [math.nan if v is None else float(v) for v in columns[name]]
    data["finish_reason"] = list(finish_reasons) if finish_reasons is not None else [None] * n
    path = os.path.join(output_dir, "completions", f"step_{step:07d}.parquet")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    pq.write_table(pa.table(data), tmp)
    os.replace(tmp, path)
    return path


def print_completions(
    step: int,
    prompts: Sequence[str],
    completions: Sequence[str],
    rewards: Sequence[float],
    advantages: Sequence[float],
    limit: int | None,
) -> None:
    """Print the first ``limit`` completions of a step (all with None) as a table, as TRL does
    with ``log_completions`` and ``num_completions_to_print``."""
    from rich.console import Console
    from rich.table import Table

    n = len(completions) if limit is None else min(limit, len(completions))
    if n == 0:
        return
    table = Table(title=f"step {step}: {n} of {len(completions)} completions", show_lines=True)
    for name in ("prompt", "completion", "reward", "advantage"):
        table.add_column(name, justify="right" if name in ("reward", "advantage") else "left")
    for i in range(n):
        table.add_row(prompts[i], completions[i], f"{rewards[i]:.3f}", f"{advantages[i]:.3f}")
    Console().print(table)
