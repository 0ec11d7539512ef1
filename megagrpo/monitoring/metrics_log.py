"""Where step metrics go: stdout, a JSONL file, and Weights & Biases.

``MetricsLogger.log(step, metrics)`` writes one JSON line per logging step to
``<output_dir>/metrics.jsonl`` (appended, so a resumed run continues the same file; readers take
the last line of a step), prints a one-line summary, and forwards to wandb when ``report_to``
names it. wandb runs offline (files under ``<output_dir>/wandb``, sync later with ``wandb sync``)
unless the user asked for online mode through ``WANDB_MODE=online``. ``first_record`` metrics
(``data/skipped_rows``, rows dropped from the prompts) go into the first record a run writes
(the step-0 evaluation, or the first logged step; after a resume, its first logged step).

Metric names are TRL's (``reward``, ``reward_std``, ``rewards/<fn>/mean``, ``kl``, ``entropy``,
``clip_ratio/region_mean``, ``completions/mean_length``, ...) so dashboards carry over. ``kl`` is
TRL's k3 estimator, a KL estimate only on the current policy's samples: with num_iterations > 1 it
is k3 on old-policy samples, heavy-tailed, a poor health signal (``training/policy_update.py``).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

METRICS_FILE = "metrics.jsonl"


@dataclass
class WandbSettings:
    """open-r1's WandB settings (entity, project, run group) plus the run name."""

    project: str | None = None
    entity: str | None = None
    group: str | None = None
    run_name: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    """The resolved recipe, stored with the run."""


def _jsonable(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def read_metrics(path: str) -> list[dict]:
    """The metrics of a JSONL file, one record per step (the last written wins)."""
    by_step: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{n}: not a JSON line") from None
            if "step" not in rec:
                raise ValueError(f"{path}:{n}: record without 'step'")
            by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


class MetricsLogger:
    """Writes metrics of the logging rank (global rank 0); other ranks pass ``enabled=False``."""

    def __init__(
        self,
        output_dir: str,
        *,
        report_to: list[str] | None = None,
        wandb: WandbSettings | None = None,
        enabled: bool = True,
        print_fn=print,
        first_record: dict[str, Any] | None = None,
    ):
        self.enabled = enabled
        self._first_record = dict(first_record or {})  # merged into the first record written
        self.path = os.path.join(output_dir, METRICS_FILE)
        self._print = print_fn
        self._wandb_run = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        targets = set(report_to or [])
        unknown = targets - {"wandb", "none", "jsonl"}
        if unknown:
            raise ValueError(
                f"report_to={sorted(targets)}: unknown target(s) {sorted(unknown)}; "
                "expected wandb or none (metrics.jsonl is always written)"
            )
        if "wandb" in targets:
            self._wandb_run = _start_wandb(output_dir, wandb or WandbSettings())

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        metrics, self._first_record = {**self._first_record, **metrics}, {}
        record = {
            "step": step,
            "time": time.time(),
            **{k: _jsonable(v) for k, v in metrics.items()},
        }
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in record.items() if k != "time"}, step=step)
        self._print(_summary(step, metrics))

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


_SUMMARY_KEYS = ("reward", "reward_std", "kl", "entropy", "completions/mean_length", "step_time")


def _summary(step: int, metrics: dict[str, Any]) -> str:
    parts = [f"step {step}"]
    for key in _SUMMARY_KEYS:
        if key in metrics and metrics[key] is not None:
            parts.append(f"{key}={float(_jsonable(metrics[key]) or 0):.4g}")
    return " | ".join(parts)


def _start_wandb(output_dir: str, settings: WandbSettings):
    try:
        import wandb
    except ImportError:
        raise RuntimeError("report_to includes wandb but wandb is not installed") from None
    mode = os.environ.get("WANDB_MODE", "offline")
    return wandb.init(
        project=settings.project or "megagrpo",
        entity=settings.entity,
        group=settings.group,
        name=settings.run_name,
        config=settings.config,
        dir=output_dir,
        mode=mode,
        resume="allow",
    )
