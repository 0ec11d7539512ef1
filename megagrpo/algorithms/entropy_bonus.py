"""The entropy bonus (``entropy_coef``) and its adaptive coefficient (``use_adaptive_entropy``).

Every micro-batch's loss gets ``- coef x H``, ``H`` the mean entropy over the tokens the policy
loss trains on (all completion tokens, or the top-entropy subset), whatever the loss type's own
normalisation (TRL 1.16's definition). Adaptive mode: after every optimizer step, with ``E`` the
step's entropy over those tokens (all micro-batches and data-parallel ranks), ``coef`` moves by
``+delta`` when ``E <= target`` and ``-delta`` otherwise, within ``[coef_min, coef_max]``; the bonus
is applied only while the last measured ``E`` is at or below the target (none before the first
measurement). The state survives checkpoints (``state_dict``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class EntropyBonus:
    coef: float
    adaptive: bool = False
    coef_min: float = 0.0
    coef_max: float = 1.0
    coef_delta: float = 0.005
    target: float = 0.2
    last_entropy: float = math.inf
    """The entropy measured at the last optimizer step (adaptive mode)."""

    @classmethod
    def from_config(cls, training) -> EntropyBonus | None:
        """None when no bonus is configured."""
        t = training
        if t.entropy_coef == 0.0 and not t.use_adaptive_entropy:
            return None
        return cls(
            coef=t.entropy_coef,
            adaptive=t.use_adaptive_entropy,
            coef_min=t.entropy_coef_min,
            coef_max=t.entropy_coef_max,
            coef_delta=t.entropy_coef_delta,
            target=t.entropy_target,
        )

    def applied_coef(self) -> float:
        """The coefficient every micro-batch of the coming optimizer step uses."""
        if self.adaptive and not self.last_entropy <= self.target:
            return 0.0
        return self.coef

    @staticmethod
    def mean_entropy(entropy_bt, mask_bt, entropy_mask_bt=None) -> torch.Tensor:
        """``H``: the (differentiable) mean entropy over the tokens the policy loss trains on."""
        m = mask_bt.to(entropy_bt.dtype)
        if entropy_mask_bt is not None:
            m = m * entropy_mask_bt.to(entropy_bt.dtype)
        return (entropy_bt * m).sum() / m.sum().clamp(min=1.0)

    def step_done(self, entropy: float) -> None:
        """Adaptive mode: update ``coef`` from the optimizer step's entropy."""
        if not self.adaptive:
            return
        if entropy <= self.target:
            self.coef = min(self.coef + self.coef_delta, self.coef_max)
        else:
            self.coef = max(self.coef - self.coef_delta, self.coef_min)
        self.last_entropy = entropy

    def state_dict(self) -> dict[str, float]:
        return {"entropy_coef": self.coef, "last_entropy": self.last_entropy}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef = float(state["entropy_coef"])
        self.last_entropy = float(state["last_entropy"])
