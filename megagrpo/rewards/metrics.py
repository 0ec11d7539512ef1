"""Step metrics of the rewards, with TRL's names.

``rewards/<fn>/mean`` and ``rewards/<fn>/std`` per function over the completions it scored (NaN
where it scored none); ``reward`` the mean total (weighted sum, TRL's nansum), ``reward_std`` the
mean of the per-prompt standard deviations of the total, ``frac_reward_zero_std`` the fraction of
prompt groups with no spread (no learning signal); and how the scoring went: ``rewards/timeouts``,
``rewards/errors``, ``rewards/crashes``, ``rewards/nones`` (calls that answered None),
``rewards/restarts`` and ``rewards/scoring_seconds``.
"""

from __future__ import annotations

import math

import torch

from megagrpo.algorithms.advantages import group_advantages
from megagrpo.rewards.scores import RewardScores


def _nan_mean_std(x: torch.Tensor) -> tuple[float, float]:
    """Mean and sample std (Bessel, as TRL's nanstd) over the non-NaN entries; NaN if none."""
    x = x[~torch.isnan(x)]
    if x.numel() == 0:
        return math.nan, math.nan
    mean = x.mean().item()
    std = x.std().item() if x.numel() > 1 else 0.0
    return mean, std


def reward_metrics(scores: RewardScores, num_generations: int | None = None) -> dict[str, float]:
    """The metrics of one step's ``RewardScores`` (group-major, groups of ``num_generations``;
    None: one group)."""
    out: dict[str, float] = {}
    for k, name in enumerate(scores.names):
        mean, std = _nan_mean_std(scores.rewards_nk[:, k])
        out[f"rewards/{name}/mean"] = mean
        out[f"rewards/{name}/std"] = std
    total_n = scores.total_n()
    n = total_n.numel()
    out["reward"] = _nan_mean_std(total_n)[0]
    if n:
        stats = group_advantages(total_n, num_generations or n)
        out["reward_std"] = float(stats.group_std_n.double().mean())
        out["frac_reward_zero_std"] = stats.frac_zero_std
    else:
        out["reward_std"] = math.nan
        out["frac_reward_zero_std"] = math.nan
    out["rewards/timeouts"] = float(scores.timeouts)
    out["rewards/errors"] = float(scores.errors)
    out["rewards/crashes"] = float(scores.crashes)
    out["rewards/nones"] = float(scores.nones)
    out["rewards/restarts"] = float(scores.restarts)
    out["rewards/scoring_seconds"] = float(scores.seconds)
    return out
