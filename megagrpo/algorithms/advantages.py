"""Group-relative advantages, NaN-aware, over the whole data-parallel generation batch.

Legend: N = completions (B prompts x G generations, group-major: completion i belongs to group
i // G), K = reward functions.

A reward function may answer ``None`` ("cannot score"), stored as NaN. A completion's reward is
the weighted sum over the functions that scored it (TRL's ``nansum``); a completion no function
scored has reward NaN, takes no part in its group's statistics and gets advantage 0, so it adds
nothing to the policy gradient.

``scale_rewards``: ``group`` divides by each group's std (GRPO), ``batch`` by the std of the
whole generation batch (TRL's "batch"; Lite-PPO), ``none`` does not divide (Dr. GRPO).

``multi_objective_aggregation`` (``multi_objective_advantages``) says how K functions make one
advantage: ``sum_then_normalize`` (the weighted sum, then ``group_advantages``) or
``normalize_then_sum`` (GDPO, arXiv 2601.05242, as TRL 1.16 computes it: each function's rewards
are centred on their group mean and divided by their group std + eps, the weighted NaN-ignoring
sum of those is centred on the batch mean and divided by the batch std + eps; ``scale_rewards``
must be ``group``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megagrpo.config.training import MULTI_OBJECTIVE_AGGREGATIONS
from megagrpo.config.training import SCALE_REWARDS as SCALE_CHOICES


def weighted_rewards(rewards_nk: torch.Tensor, weights_k: torch.Tensor) -> torch.Tensor:
    """Weighted sum over reward functions, ignoring NaN; NaN where no function scored."""
    scored_nk = ~torch.isnan(rewards_nk)
    total_n = torch.nansum(rewards_nk * weights_k.to(rewards_nk), dim=1)
    return torch.where(scored_nk.any(dim=1), total_n, torch.full_like(total_n, float("nan")))


def _nanstd(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sample standard deviation (Bessel-corrected, as torch.std) ignoring NaN; 0 if < 2."""
    valid = ~torch.isnan(x)
    count = valid.sum(dim=dim, keepdim=True)
    mean = torch.nansum(x, dim=dim, keepdim=True) / count.clamp(min=1)
    sq = torch.where(valid, (x - mean) ** 2, torch.zeros_like(x)).sum(dim=dim, keepdim=True)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    return torch.where(count >= 2, std, torch.zeros_like(std)).squeeze(dim)


def _is_zero(std_b: torch.Tensor) -> torch.Tensor:
    return torch.isclose(std_b, torch.zeros_like(std_b))


def zero_std_groups(rewards_n: torch.Tensor, num_generations: int) -> torch.Tensor:
    """bool [B]: the groups whose scored rewards are all equal, or that have fewer than two
    scored members (std 0): no learning signal (``GroupStats.frac_zero_std`` counts them)."""
    return _is_zero(_nanstd(rewards_n.double().view(-1, num_generations), dim=1))


@dataclass(frozen=True)
class GroupStats:
    """Per-completion advantage and the group statistics behind it."""

    advantages_n: torch.Tensor
    group_mean_n: torch.Tensor
    group_std_n: torch.Tensor
    frac_zero_std: float
    """Fraction of groups whose scored rewards are all equal, or that have fewer than two scored
    members: groups with no learning signal (TRL's frac_reward_zero_std)."""


def group_advantages(
    rewards_n: torch.Tensor,
    num_generations: int,
    scale_rewards: str = "group",
    eps: float = 1e-4,
) -> GroupStats:
    """Advantages of ``rewards_n`` (group-major, NaN = unscored)."""
    if scale_rewards not in SCALE_CHOICES:
        raise ValueError(f"scale_rewards={scale_rewards!r}; expected one of {SCALE_CHOICES}")
    n = rewards_n.numel()
    if num_generations < 1 or n % num_generations:
        raise ValueError(
            f"{n} completions do not form whole groups of num_generations={num_generations}"
        )
    r_bg = rewards_n.double().view(-1, num_generations)
    valid_bg = ~torch.isnan(r_bg)
    count_b = valid_bg.sum(dim=1, keepdim=True)
    mean_b = torch.nansum(r_bg, dim=1, keepdim=True) / count_b.clamp(min=1)
    std_b = _nanstd(r_bg, dim=1).unsqueeze(1)
    centered_bg = r_bg - mean_b
    if scale_rewards == "group":
        adv_bg = centered_bg / (std_b + eps)
    elif scale_rewards == "batch":
        adv_bg = centered_bg / (_nanstd(r_bg.reshape(1, -1), dim=1) + eps)
    else:
        adv_bg = centered_bg
    adv_bg = torch.where(valid_bg, adv_bg, torch.zeros_like(adv_bg))
    zero_std = _is_zero(std_b.squeeze(1))
    dtype = rewards_n.dtype if rewards_n.is_floating_point() else torch.float32
    return GroupStats(
        advantages_n=adv_bg.reshape(-1).to(dtype),
        group_mean_n=mean_b.expand_as(r_bg).reshape(-1).to(dtype),
        group_std_n=std_b.expand_as(r_bg).reshape(-1).to(dtype),
        frac_zero_std=zero_std.double().mean().item(),
    )


def decoupled_advantages(
    rewards_nk: torch.Tensor, weights_k: torch.Tensor, num_generations: int, eps: float = 1e-4
) -> GroupStats:
    """GDPO's normalize_then_sum: per-function group normalisation, weighted sum, then batch
    normalisation. A completion no function scored gets advantage 0; a function's NaN is left out
    of its group's statistics and of the sum (TRL's nanmean / nansum)."""
    n, k = rewards_nk.shape
    if num_generations < 1 or n % num_generations:
        raise ValueError(
            f"{n} completions do not form whole groups of num_generations={num_generations}"
        )
    r_bgk = rewards_nk.double().view(-1, num_generations, k)
    valid_bgk = ~torch.isnan(r_bgk)
    count_bk = valid_bgk.sum(dim=1, keepdim=True)
    mean_bk = torch.nansum(r_bgk, dim=1, keepdim=True) / count_bk.clamp(min=1)
    std_bk = _nanstd(r_bgk, dim=1).unsqueeze(1)
    norm_nk = ((r_bgk - mean_bk) / (std_bk + eps)).view(n, k)
    total_n = weighted_rewards(norm_nk, weights_k.double())
    scored_n = ~torch.isnan(total_n)
    batch_mean = total_n[scored_n].mean() if scored_n.any() else total_n.new_zeros(())
    batch_std = _nanstd(total_n.view(1, -1), dim=1).squeeze(0)
    adv_n = torch.where(scored_n, (total_n - batch_mean) / (batch_std + eps), 0.0)
    group_std_n = _nanstd(total_n.view(-1, num_generations), dim=1)
    zero_std = torch.isclose(group_std_n, torch.zeros_like(group_std_n))
    dtype = rewards_nk.dtype if rewards_nk.is_floating_point() else torch.float32
    return GroupStats(
        advantages_n=adv_n.to(dtype),
        group_mean_n=batch_mean.expand(n).to(dtype),
        group_std_n=batch_std.expand(n).to(dtype),
        frac_zero_std=zero_std.double().mean().item(),
    )


def multi_objective_advantages(
    rewards_nk: torch.Tensor,
    weights_k: torch.Tensor,
    num_generations: int,
    scale_rewards: str = "group",
    aggregation: str = "sum_then_normalize",
) -> GroupStats:
    """Advantages of K reward functions' scores [N, K] under ``multi_objective_aggregation``."""
    if aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
        raise ValueError(
            f"multi_objective_aggregation={aggregation!r}; expected one of "
            f"{MULTI_OBJECTIVE_AGGREGATIONS}"
        )
    if aggregation == "normalize_then_sum":
        if scale_rewards != "group":
            raise ValueError(
                f"multi_objective_aggregation='normalize_then_sum' needs scale_rewards='group', "
                f"got {scale_rewards!r}"
            )
        return decoupled_advantages(rewards_nk, weights_k, num_generations)
    return group_advantages(weighted_rewards(rewards_nk, weights_k), num_generations, scale_rewards)


def dp_group_advantages(
    rewards_n: torch.Tensor,
    num_generations: int,
    scale_rewards: str,
    dp_group=None,
    eps: float = 1e-4,
) -> GroupStats:
    """``group_advantages`` over the generation batch of all data-parallel ranks.

    Each rank holds whole groups (``validate_layout`` guarantees it); the rewards of all ranks are
    gathered so batch-level scaling and the group statistics see the global batch, and each rank
    gets back the advantages of its own completions.
    """
    if dp_group is None or dist.get_world_size(dp_group) == 1:
        return group_advantages(rewards_n, num_generations, scale_rewards, eps)
    world, rank = dist.get_world_size(dp_group), dist.get_rank(dp_group)
    device = rewards_n.device
    size_parts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    local = torch.tensor([rewards_n.numel()], dtype=torch.int64, device=device)
    dist.all_gather(size_parts, local, group=dp_group)
    sizes = torch.cat(size_parts).cpu()
    if bool((sizes % num_generations).any()):
        raise ValueError(
            f"completions per data-parallel rank {sizes.tolist()} are not whole groups of "
            f"num_generations={num_generations}: a group would straddle ranks"
        )
    parts = [torch.empty(int(s), dtype=rewards_n.dtype, device=device) for s in sizes]
    dist.all_gather(parts, rewards_n.contiguous(), group=dp_group)
    stats = group_advantages(torch.cat(parts), num_generations, scale_rewards, eps)
    start = int(sizes[:rank].sum())
    sl = slice(start, start + rewards_n.numel())
    return GroupStats(
        stats.advantages_n[sl], stats.group_mean_n[sl], stats.group_std_n[sl], stats.frac_zero_std
    )
