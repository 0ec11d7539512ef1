"""The knobs of the GRPO per-token loss, shared by the kernels' wrappers and the references."""

from __future__ import annotations

from dataclasses import dataclass

LEVELS = ("token", "sequence", "sequence_token")


@dataclass(frozen=True)
class GRPOLossSpec:
    """The knobs of the GRPO per-token loss (validated on construction)."""

    epsilon_low: float = 0.2
    """Lower clip: the ratio is clipped below at ``1 - epsilon_low``."""
    epsilon_high: float = 0.2
    """Upper clip: the ratio is clipped above at ``1 + epsilon_high`` (DAPO's clip-higher)."""
    delta: float | None = None
    """Cap on the unclipped ratio (two-sided GRPO); None for no cap."""
    beta: float = 0.0
    """Weight of the k3 KL to the reference policy; needs ``ref_logp`` when non-zero."""
    tis_cap: float | None = None
    """Cap of the truncated importance weight ``exp(old - sampler)``; None for no cap."""
    importance_sampling_level: str = "token"
    """"token" (GRPO), "sequence" (GSPO) or "sequence_token" (GSPO-token)."""

    def __post_init__(self):
        if not 0.0 <= self.epsilon_low < 1.0:
            raise ValueError(f"epsilon_low: expected a number in [0, 1), got {self.epsilon_low!r}")
        if not self.epsilon_high >= 0.0:
            raise ValueError(f"epsilon_high: expected a number >= 0, got {self.epsilon_high!r}")
        if self.delta is not None and not self.delta > 0.0:
            raise ValueError(f"delta: expected None or a number > 0, got {self.delta!r}")
        if not self.beta >= 0.0:
            raise ValueError(f"beta: expected a number >= 0, got {self.beta!r}")
        if self.tis_cap is not None and not self.tis_cap > 0.0:
            raise ValueError(f"tis_cap: expected None or a number > 0, got {self.tis_cap!r}")
        if self.importance_sampling_level not in LEVELS:
            raise ValueError(
                f"importance_sampling_level: expected one of {LEVELS}, got "
                f"{self.importance_sampling_level!r}"
            )
