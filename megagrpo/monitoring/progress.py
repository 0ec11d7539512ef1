"""A rich progress bar over the training steps, showing the phase a step is in.

Shown on global rank 0 when stdout is a terminal (logs and CI get the one-line step summaries of
``MetricsLogger`` instead): steps done / total, elapsed and remaining time, and the current phase
(rollout and scoring, log-probs, update, weight sync) with the last step's reward.
"""

from __future__ import annotations

import sys


class StepProgress:
    def __init__(self, total: int, done: int, *, enabled: bool):
        self._progress = None
        if not (enabled and sys.stdout.isatty()):
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("GRPO"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[phase]}"),
        )
        self._task = self._progress.add_task("steps", total=total, completed=done, phase="")
        self._progress.start()
        self._last = ""

    def phase(self, name: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, phase=f"{name}{self._last}")

    def step_done(self, metrics: dict) -> None:
        if self._progress is not None:
            reward = metrics.get("reward")
            self._last = f"  (last reward {reward:.3f})" if reward == reward else ""
            self._progress.update(self._task, advance=1, phase=self._last.strip())

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
