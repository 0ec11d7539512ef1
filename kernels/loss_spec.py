"""The knobs of the GRPO per-token loss: one frozen object, built once, read by every kernel.

``megagrpo.algorithms.loss_variants.loss_spec`` builds it from a recipe; the kernels' wrappers
(:func:`grpo_loss.grpo_loss`, :func:`fused_logprob_loss.logprob_grpo_loss`), the torch references
and the Triton kernels all take this object, so a new knob is one field here plus its use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LEVELS = ("token", "sequence", "sequence_token")
OBJECTIVES = ("clip", "cispo", "sapo", "vespo")


@dataclass(frozen=True)
class GRPOLossSpec:
    """The knobs of the GRPO per-token loss (validated on construction).

    Per token (``A`` the advantage, ``r = exp(logw)`` the importance ratio of
    ``importance_sampling_level``, ``w`` the policy weight: off-policy mask x entropy mask x
    sampler importance weight):

    - ``clip`` (PPO / GRPO / DAPO / Dr. GRPO / LUSPO): ``-min(r' A, clamp(r, 1-el, 1+eh) A) w``
      with ``r' = min(r, delta)`` when ``delta`` is set;
    - ``cispo`` (MiniMax-M1): ``-sg(min(r, epsilon_high)) A logp w``;
    - ``sapo`` (soft adaptive policy optimisation): ``-sigmoid(tau (r - 1)) 4 / tau A w``, ``tau``
      = ``sapo_temperature_pos`` for ``A > 0``, else ``sapo_temperature_neg``;
    - ``vespo``: ``-sg(phi) A logp w`` with the sequence's gamma weight
      ``phi = exp(lambda + k log W - lambda W)``, ``W`` the sequence's summed importance ratio
      (times the sampler ratio), ``k, lambda`` by the sign of ``A``; the sampler weight enters
      ``W`` instead of ``w``;

    plus ``beta * k3`` with ``k3 = exp(ref - logp) - (ref - logp) - 1``, times ``r`` when
    ``kl_bias_correction``.
    """

    objective: str = "clip"
    """"clip", "cispo", "sapo" or "vespo" (see the class docstring)."""
    temperature: float = 1.0
    """Sampling temperature the logits are divided by (logits-side wrappers only)."""
    epsilon_low: float = 0.2
    """Lower clip: the ratio is clipped below at ``1 - epsilon_low`` ("clip")."""
    epsilon_high: float = 0.2
    """Upper clip ``1 + epsilon_high`` ("clip", DAPO's clip-higher); for "cispo" the cap of the
    ratio itself (CISPO's epsilon_max, e.g. 5.0)."""
    delta: float | None = None
    """Cap on the unclipped ratio (two-sided GRPO, "clip" only); None for no cap."""
    beta: float = 0.0
    """Weight of the k3 KL to the reference policy; needs ``ref_logp`` when non-zero."""
    kl_bias_correction: bool = False
    """Multiply the k3 KL by the importance ratio (TRL's ``use_bias_correction_kl``)."""
    importance_sampling_level: str = "token"
    """"token" (GRPO), "sequence" (GSPO) or "sequence_token" (GSPO-token)."""
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    off_policy_mask_threshold: float | None = None
    """DeepSeek-V3.2's off-policy sequence mask: a sequence with ``A < 0`` whose mean
    ``sampler_logp - logp`` exceeds this is left out of the policy term; None disables."""
    top_entropy_quantile: float = 1.0
    """Only tokens at or above this top quantile of entropy take part in the policy term
    ("Beyond the 80/20 rule"); 1.0 keeps all."""

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {OBJECTIVES}, got {self.objective!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0.0):
            raise ValueError(f"temperature: expected a number > 0, got {self.temperature!r}")
        if not 0.0 <= self.epsilon_low < 1.0:
            raise ValueError(f"epsilon_low: expected a number in [0, 1), got {self.epsilon_low!r}")
        if not self.epsilon_high >= 0.0:
            raise ValueError(f"epsilon_high: expected a number >= 0, got {self.epsilon_high!r}")
        if self.delta is not None and not self.delta > 0.0:
            raise ValueError(f"delta: expected None or a number > 0, got {self.delta!r}")
        if not self.beta >= 0.0:
            raise ValueError(f"beta: expected a number >= 0, got {self.beta!r}")
        if self.importance_sampling_level not in LEVELS:
            raise ValueError(
                f"importance_sampling_level: expected one of {LEVELS}, got "
                f"{self.importance_sampling_level!r}"
            )
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            if not getattr(self, name) > 0.0:
                raise ValueError(f"{name}: expected a number > 0, got {getattr(self, name)!r}")
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name}: expected a number >= 0, got {getattr(self, name)!r}")
        if self.off_policy_mask_threshold is not None and not math.isfinite(
            self.off_policy_mask_threshold
        ):
            raise ValueError(
                f"off_policy_mask_threshold: expected None or a finite number, got "
                f"{self.off_policy_mask_threshold!r}"
            )
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ValueError(
                f"top_entropy_quantile: expected a number in [0, 1], got "
                f"{self.top_entropy_quantile!r}"
            )

    @property
    def needs_sequences(self) -> bool:
        """Whether the loss needs each token's sequence (sequence levels, VESPO, the off-policy
        mask)."""
        return (
            self.importance_sampling_level != "token"
            or self.objective == "vespo"
            or self.off_policy_mask_threshold is not None
        )

    @property
    def needs_entropy(self) -> bool:
        """Whether the policy term needs the tokens' entropies (the top-entropy mask)."""
        return self.top_entropy_quantile < 1.0

    def unfused_reason(self) -> str | None:
        """Why the single logits-to-loss kernel cannot compute this loss (None when it can):
        it sees one row at a time, so nothing may depend on other tokens of the sequence or the
        batch."""
        if self.importance_sampling_level != "token":
            return f"importance_sampling_level={self.importance_sampling_level!r}"
        if self.objective == "vespo":
            return "objective='vespo' (a per-sequence weight)"
        if self.off_policy_mask_threshold is not None:
            return "off_policy_mask_threshold (a per-sequence mask)"
        if self.needs_entropy:
            return "top_entropy_quantile < 1 (a quantile over the batch's entropies)"
        return None
