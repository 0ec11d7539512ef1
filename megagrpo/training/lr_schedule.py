"""Learning-rate schedules with transformers' definitions, as a plain function of the step.

The trainer sets the learning rate of every parameter group itself before each optimizer step,
so the same schedule drives megatron's optimizer on GPU and torch AdamW on CPU, and resuming
needs only the step. The factors equal those of ``transformers.get_scheduler`` for the same
name (a test checks it), so open-r1 recipes keep their meaning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megagrpo.config.training import LR_SCHEDULERS as SCHEDULES


@dataclass(frozen=True)
class LRSchedule:
    name: str
    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr_rate: float = 0.0
    """cosine_with_min_lr: the floor as a fraction of peak_lr."""

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ValueError(f"lr_scheduler_type={self.name!r}; expected one of {SCHEDULES}")
        if self.total_steps < 1:
            raise ValueError(f"total training steps must be >= 1, got {self.total_steps}")

    def factor(self, step: int) -> float:
        """Multiplier of peak_lr for the optimizer step that follows ``step`` completed steps."""
        if self.name == "constant":
            return 1.0
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        if self.name == "constant_with_warmup":
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        if self.name == "linear":
            return max(
                0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps)
            )
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.name == "cosine":
            return max(0.0, cosine)
        return max(0.0, cosine * (1 - self.min_lr_rate) + self.min_lr_rate)

    def lr(self, step: int) -> float:
        return self.peak_lr * self.factor(step)


def schedule_from_config(training, total_steps: int) -> LRSchedule:
    """The schedule a ``GRPOConfig`` asks for, over ``total_steps`` optimizer steps."""
    warmup = training.warmup_steps or math.ceil(training.warmup_ratio * total_steps)
    kwargs = dict(training.lr_scheduler_kwargs or {})
    min_lr_rate = 0.0
    if training.lr_scheduler_type == "cosine_with_min_lr":
        if "min_lr" in kwargs:
            min_lr_rate = float(kwargs["min_lr"]) / training.learning_rate
        else:
            min_lr_rate = float(kwargs.get("min_lr_rate", 0.0))
    return LRSchedule(
        name=training.lr_scheduler_type,
        peak_lr=training.learning_rate,
        total_steps=total_steps,
        warmup_steps=warmup,
        min_lr_rate=min_lr_rate,
    )
