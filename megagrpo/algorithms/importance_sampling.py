"""The sampler importance weight: ``pi_old / pi_sampler`` per token or per completion, truncated
or masked (TRL's ``vllm_importance_sampling_mode``).

The rollout engine's log-probs differ from the trainer's for the same weights (other kernels,
precision, vLLM's sampling); the policy loss of each token is multiplied by this weight to
correct for it. Modes:

- ``token_truncate``: ``clamp(exp(old - sampler), clip_min, clip_max)`` per token (TIS);
- ``token_mask``: the same ratio, 0 where it leaves ``[clip_min, clip_max]`` (MIS);
- ``sequence_truncate`` / ``sequence_mask``: one ratio per completion, ``exp`` of the sum of
  its tokens' log-ratio, truncated / masked the same way.

Tokens outside the completion mask and tokens the sampler could not score (NaN) count as ratio 1.
Legend: B completions, T positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImportanceSampling:
    mode: str
    clip_min: float | None
    clip_max: float | None

    @classmethod
    def from_config(cls, training) -> ImportanceSampling | None:
        """None when the correction is off."""
        if not training.vllm_importance_sampling_correction:
            return None
        return cls(
            training.vllm_importance_sampling_mode,
            training.vllm_importance_sampling_clip_min,
            training.vllm_importance_sampling_clip_max,
        )

    @torch.no_grad()
    def weights(self, old_bt, sampler_bt, mask_bt) -> torch.Tensor:
        """``[B, T]`` weights (a completion's weight repeated over its positions)."""
        diff_bt = torch.nan_to_num((old_bt - sampler_bt) * mask_bt.to(old_bt.dtype), nan=0.0)
        if self.mode.startswith("sequence_"):
            diff_bt = diff_bt.sum(-1, keepdim=True).expand_as(diff_bt)
        ratio_bt = torch.exp(diff_bt)
        if self.mode.endswith("_truncate"):
            return torch.clamp(ratio_bt, min=self.clip_min, max=self.clip_max)
        lo = -float("inf") if self.clip_min is None else self.clip_min
        hi = float("inf") if self.clip_max is None else self.clip_max
        return ratio_bt.masked_fill((ratio_bt < lo) | (ratio_bt > hi), 0.0)
