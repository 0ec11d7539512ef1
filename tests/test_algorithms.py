"""Advantages and loss types against hand-computed values and TRL's formulas."""

from __future__ import annotations

import math

import pytest
import torch
from _multiproc import run_ranks

from megagrpo.algorithms.advantages import dp_group_advantages, group_advantages, weighted_rewards
from megagrpo.algorithms.loss_aggregation import BatchContext, get_loss_type

NAN = float("nan")


def test_weighted_rewards_nansum_and_unscored():
    r = torch.tensor([[1.0, 0.5], [NAN, 1.0], [NAN, NAN], [0.0, 0.0]])
    w = torch.tensor([2.0, 1.0])
    out = weighted_rewards(r, w)
    assert out[:2].tolist() == [2.5, 1.0] and math.isnan(out[2]) and out[3] == 0.0


def test_group_advantages_hand_computed():
    s = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), 4)
    std = math.sqrt(1 / 3)  # Bessel-corrected, as torch.std and TRL
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 2
    assert s.advantages_n[:4].tolist() == pytest.approx(
        [expected[0], expected[1], expected[1], expected[0]]
    )
    assert s.advantages_n[4:].tolist() == [0.0] * 4
    assert s.frac_zero_std == 0.5
    assert s.group_mean_n.tolist() == [0.5] * 4 + [2.0] * 4


def test_unscored_completions_are_left_out_of_their_group():
    s = group_advantages(
        torch.tensor([1.0, NAN, 0.0, 0.0, NAN, NAN, NAN, NAN, 3.0, NAN, NAN, NAN]), 4
    )
    std = math.sqrt(1 / 3)  # of (1, 0, 0)
    assert s.advantages_n[0].item() == pytest.approx((2 / 3) / (std + 1e-4))
    assert s.advantages_n[1].item() == 0.0
    assert s.advantages_n[2].item() == pytest.approx((-1 / 3) / (std + 1e-4))
    assert s.advantages_n[4:].tolist() == [0.0] * 8  # all-unscored group, one-member group
    assert s.frac_zero_std == pytest.approx(2 / 3)
    assert not torch.isnan(s.advantages_n).any()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_matches_trl_formula_without_nan(scale):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(6 * 8, generator=g)
    mean = r.view(-1, 8).mean(1).repeat_interleave(8)
    if scale == "group":
        ref = (r - mean) / (r.view(-1, 8).std(1).repeat_interleave(8) + 1e-4)
    elif scale == "batch":
        ref = (r - mean) / (r.std() + 1e-4)
    else:
        ref = r - mean
    torch.testing.assert_close(group_advantages(r, 8, scale).advantages_n, ref)


def test_bad_inputs():
    with pytest.raises(ValueError, match="scale_rewards='mean'"):
        group_advantages(torch.zeros(4), 2, "mean")
    with pytest.raises(
        ValueError, match="5 completions do not form whole groups of num_generations=2"
    ):
        group_advantages(torch.zeros(5), 2)


def _dp_worker(rewards, scale):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    local = rewards.view(2, -1)[rank]
    s = dp_group_advantages(local, 4, scale, dist.group.WORLD)
    return s.advantages_n, s.frac_zero_std


@pytest.mark.parametrize("scale", ["batch", "group"])
def test_dp_gathered_equals_single_batch(scale):
    r = torch.tensor(
        [1.0, 0.0, 0.0, 1.0, 3.0, 1.0, NAN, 2.0, 0.0, 0.0, 0.0, 0.0, 5.0, 1.0, 2.0, 1.0]
    )
    ref = group_advantages(r, 4, scale)
    got = run_ranks(2, _dp_worker, r, scale)
    torch.testing.assert_close(torch.cat([a for a, _ in got]), ref.advantages_n)
    assert all(f == ref.frac_zero_std for _, f in got)


LOSS = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


@pytest.mark.parametrize(
    "name,expected",
    [
        ("grpo", ((1 + 2 + 3) / 3 + (10 + 20) / 2) / 2),
        ("bnpo", (1 + 2 + 3 + 10 + 20) / 5),
        ("dr_grpo", (1 + 2 + 3 + 10 + 20) / (2 * 8)),
        ("dapo", (1 + 2 + 3 + 10 + 20) / 12),
        ("cispo", (1 + 2 + 3 + 10 + 20) / 12),
        ("vespo", (1 + 2 + 3 + 10 + 20) / 12),
        ("sapo", ((1 + 2 + 3) / 3 + (10 + 20) / 2) / 2),
        ("luspo", ((1 + 2 + 3) + (10 + 20)) / 2),
    ],
)
def test_loss_types_hand_computed(name, expected):
    ctx = BatchContext(num_microbatches=3, dp_size=2, max_completion_length=8, global_num_tokens=12)
    lt = get_loss_type(name)
    assert lt.objective(LOSS, MASK, ctx).item() == pytest.approx(expected)
    # the global token mean undoes megatron's / micro-batches and DP average
    scale = 6 if name in ("dapo", "cispo", "vespo") else 1
    assert lt.loss(LOSS, MASK, ctx).item() == pytest.approx(expected * scale)


def test_dapo_gradient_over_microbatches_is_the_global_token_mean():
    """Two micro-batches through megatron's convention (sum of loss / M) give the gradient of
    the token mean over the whole batch, whatever the split."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 5, generator=g, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    ctx = BatchContext(
        num_microbatches=2, dp_size=1, max_completion_length=5, global_num_tokens=int(mask.sum())
    )
    lt = get_loss_type("dapo")
    total = sum(lt.loss(logits[i : i + 2] ** 2, mask[i : i + 2], ctx) / 2 for i in (0, 2))
    (grad,) = torch.autograd.grad(total, logits)
    ref = ((logits**2) * mask).sum() / mask.sum()
    (ref_grad,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(grad, ref_grad)


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="loss_type='ppo'; expected one of"):
        get_loss_type("ppo")
