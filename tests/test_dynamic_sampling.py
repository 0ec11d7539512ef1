"""DAPO's dynamic sampling, piece by piece: which groups have no signal, how many rounds a step
takes, which groups train (surplus, rounding to the layout, padding at the bound), where the
extra rounds' prompts come from, and the step batch assembled from several rounds with
advantages over the kept groups only."""

from __future__ import annotations

import math

import pytest
import torch

from megagrpo.algorithms.advantages import group_advantages, zero_std_groups
from megagrpo.algorithms.dynamic_sampling import (
    BatchQuota,
    needs_another_round,
    select_groups,
)
from megagrpo.data.sampler import GenerationRounds, PromptSampler
from megagrpo.rewards.scores import RewardScores
from megagrpo.rollout.protocol import Sample
from megagrpo.training.rollout_step import ScoredRound, assemble_step, requests_for

NAN = float("nan")


def test_zero_std_groups_are_those_whose_scored_rewards_agree():
    rewards = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0],  # all agree
            [1.0, 0.0, 1.0, 1.0],  # signal
            [NAN, 2.0, NAN, 2.0],  # the scored ones agree
            [NAN, NAN, NAN, 3.0],  # one scored member: no std
            [NAN, NAN, NAN, NAN],  # nothing scored
            [0.5, 0.5, 0.5, 0.5 + 1e-3],  # a small spread is a signal
        ]
    ).flatten()
    assert zero_std_groups(rewards, 4).tolist() == [True, False, True, True, True, False]
    # the same groups GroupStats counts
    assert group_advantages(rewards, 4).frac_zero_std == pytest.approx(4 / 6)


def test_quota_for_layout_is_the_smallest_batch_every_rank_can_train():
    # 8 completions per group, micro-batches of 16: 2 groups per micro-batch, per rank
    q = BatchQuota.for_layout(8, num_generations=8, dp_size=1, micro_batch_size=16, max_rounds=3)
    assert (q.groups, q.multiple, q.max_rounds) == (8, 2, 3)
    # DP=2, groups of 4 in micro-batches of 6: 3 groups (12 completions) per rank at least
    q = BatchQuota.for_layout(12, num_generations=4, dp_size=2, micro_batch_size=6, max_rounds=1)
    assert q.multiple == 6
    # micro-batches smaller than a group: one group per rank will do
    assert (
        BatchQuota.for_layout(
            4, num_generations=8, dp_size=4, micro_batch_size=2, max_rounds=2
        ).multiple
        == 4
    )
    # the interleaved pipeline schedule: micro-batches per rank a multiple of PP=2
    assert (
        BatchQuota.for_layout(
            8,
            num_generations=8,
            dp_size=1,
            micro_batch_size=16,
            max_rounds=2,
            microbatch_multiple=2,
        ).multiple
        == 4
    )
    with pytest.raises(ValueError, match="max_rounds must be an int >= 1, got 0"):
        BatchQuota(groups=8, multiple=2, max_rounds=0)
    with pytest.raises(ValueError, match="8 groups is not a multiple of 3"):
        BatchQuota(groups=8, multiple=3, max_rounds=2)


def _signal(bits: str) -> torch.Tensor:
    return torch.tensor([b == "1" for b in bits])


QUOTA = BatchQuota(groups=4, multiple=2, max_rounds=3)


def test_rounds_continue_until_the_batch_is_full_or_the_bound():
    assert needs_another_round(_signal("1001"), 1, QUOTA)  # 2 of 4
    assert not needs_another_round(_signal("10010110"), 2, QUOTA)  # 4 of 4
    assert needs_another_round(_signal("00000100"), 2, QUOTA)
    assert not needs_another_round(_signal("000001000000"), 3, QUOTA)  # the bound
    assert not needs_another_round(_signal("0000"), 1, BatchQuota(4, 2, max_rounds=1))


@pytest.mark.parametrize(
    "bits, rounds, kept, filtered, padded, surplus",
    [
        # the first round has a signal everywhere: nothing else happens
        ("1111", 1, [0, 1, 2, 3], 0, 0, 0),
        # full after two rounds; the second round's last signal group is surplus
        ("10010111", 2, [0, 3, 5, 6], 3, 0, 1),
        # the bound: 3 signal groups, trimmed to 2 (a multiple of 2), the third is surplus
        ("100000100100", 3, [0, 6], 9, 0, 1),
        # the bound with one signal group: the latest zero-std group fills the batch to 2
        ("000000100000", 3, [6, 11], 10, 1, 0),
        # no signal at all: the last round's two latest groups train (advantage 0)
        ("000000000000", 3, [10, 11], 10, 2, 0),
    ],
)
def test_which_groups_train(bits, rounds, kept, filtered, padded, surplus):
    sel = select_groups(_signal(bits), rounds, QUOTA)
    assert sel.kept == kept
    assert sel.metrics() == {
        "dynamic_sampling/rounds": float(rounds),
        "dynamic_sampling/filtered_groups": float(filtered),
        "dynamic_sampling/kept_groups": float(len(kept)),
        "dynamic_sampling/padded_groups": float(padded),
        "dynamic_sampling/surplus_groups": float(surplus),
    }
    assert filtered + len(kept) + surplus == len(bits)


def test_extra_rounds_draw_new_prompts_as_a_function_of_step_and_round():
    first = PromptSampler(40, 4, seed=7)
    rounds = GenerationRounds(first, max_rounds=3)
    assert [rounds.rows_at(s, 0) for s in range(12)] == [first.rows_at(s) for s in range(12)]
    # the same answer from a fresh object (a resumed run): nothing but (seed, step, round)
    again = GenerationRounds(PromptSampler(40, 4, seed=7), max_rounds=3)
    table = {(s, r): rounds.rows_at(s, r) for s in range(12) for r in range(3)}
    assert table == {(s, r): again.rows_at(s, r) for s in range(12) for r in range(3)}
    # an extra round's prompts are new to the step
    for s in range(12):
        drawn = [row for r in range(3) for row in table[s, r]]
        assert len(drawn) == len(set(drawn)) and len(table[s, 0]) == 4
    # each step owns 2 slots of the refill stream, which covers the prompts once per epoch
    slots = [rounds.refill.rows_at(k) for k in range(10)]
    assert sorted(row for slot in slots for row in slot) == list(range(40))
    assert table[0, 1] == [row for row in slots[0] if row not in table[0, 0]]
    assert table[3, 2] == [row for row in slots[7] if row not in table[3, 0] + table[3, 1]]
    # a dataset of one step has nothing new to give
    assert GenerationRounds(PromptSampler(4, 4, seed=0), 2).rows_at(5, 1) == []
    # another seed, other prompts
    assert GenerationRounds(PromptSampler(40, 4, seed=8), 3).rows_at(0, 1) != table[0, 1]
    # the refill stream is not the first stream shifted
    assert table[0, 1] not in [first.rows_at(s) for s in range(10)]
    with pytest.raises(ValueError, match="round 3 of step 0: expected 0 .. 2"):
        rounds.rows_at(0, 3)
    with pytest.raises(ValueError, match="max_generation_rounds must be an int >= 1, got 0"):
        GenerationRounds(first, max_rounds=0)


def test_extra_rounds_get_their_own_seeds_and_request_ids():
    dataset = [{"prompt_ids": [1, 2, 3]}] * 10
    r0 = requests_for([4, 5], dataset, step=3, seed=42)
    # round 0 keeps the formula of a run without dynamic sampling
    assert [r.seed for r in r0] == [42 * 1_000_003 + 3 * 7919 + row for row in (4, 5)]
    assert [r.request_id for r in r0] == ["3:4", "3:5"]
    r1 = requests_for([4, 5], dataset, step=3, seed=42, round_=1)
    r2 = requests_for([4, 5], dataset, step=3, seed=42, round_=2)
    assert [r.request_id for r in r1] == ["3.1:4", "3.1:5"]
    seeds = {r.seed for r in r0 + r1 + r2}
    assert len(seeds) == 6 and all(0 <= s < 2**62 for s in seeds)


def _round(rewards_bg: list[list[float]], rows: list[int], prompt_base: int) -> ScoredRound:
    """A scored round of len(rows) groups with the given total rewards (one function)."""
    groups, ids = [], []
    for b in range(len(rows)):
        group = []
        for j, _ in enumerate(rewards_bg[b]):
            completion = [40 + b, 50 + j]
            group.append(
                Sample([prompt_base + b, 9], completion, [-0.5, -0.25], "stop", 1, index=j)
            )
            ids.append(completion)
        groups.append(group)
    r_nk = torch.tensor([v for g in rewards_bg for v in g], dtype=torch.float64).unsqueeze(1)
    scores = RewardScores(
        rewards_nk=r_nk,
        status_nk=torch.ones_like(r_nk, dtype=torch.int8),
        names=["accuracy_reward"],
        weights_k=torch.tensor([1.0], dtype=torch.float64),
        seconds=0.5,
    )
    texts = [f"t{row}.{j}" for row, g in zip(rows, rewards_bg) for j in range(len(g))]
    return ScoredRound(groups, rows, ids, texts, scores, seconds=0.25)


def test_the_step_trains_on_the_kept_groups_with_their_own_advantages():
    from megagrpo.demo.tokenizer import build_demo_tokenizer

    first = _round([[1, 1, 1], [0, 1, 1], [2, 2, 2]], rows=[10, 11, 12], prompt_base=60)
    second = _round([[0, 0, 3], [5, 5, 5], [1, 0, 0]], rows=[20, 21, 22], prompt_base=70)
    signal = ~zero_std_groups(torch.cat([first.total_n(), second.total_n()]), 3)
    assert signal.tolist() == [False, True, False, True, False, True]
    sel = select_groups(signal, 2, BatchQuota(groups=2, multiple=1, max_rounds=2))
    assert sel.kept == [1, 3] and sel.surplus == 1 and sel.filtered == 3
    data = assemble_step(
        [first, second], sel.kept, build_demo_tokenizer(), 3, scale_rewards="batch", step=5
    )
    assert data.prompt_rows == [11, 20]
    assert data.rewards_n.tolist() == [0, 1, 1, 0, 0, 3]
    assert data.completion_ids == [[41, 50], [41, 51], [41, 52], [40, 50], [40, 51], [40, 52]]
    assert data.prompt_ids == [[61, 9]] * 3 + [[70, 9]] * 3
    assert data.texts["completions"] == ["t11.0", "t11.1", "t11.2", "t20.0", "t20.1", "t20.2"]
    # batch scaling divides by the std of the kept batch, not of everything generated
    kept = torch.tensor([0.0, 1, 1, 0, 0, 3])
    centered = kept - torch.tensor([2 / 3] * 3 + [1.0] * 3)
    expected = centered / (kept.std() + 1e-4)
    assert data.advantages_n.tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    # the reward metrics describe all 18 completions the step generated
    everything = torch.tensor([1.0, 1, 1, 0, 1, 1, 2, 2, 2, 0, 0, 3, 5, 5, 5, 1, 0, 0])
    assert data.metrics["reward"] == pytest.approx(everything.mean().item())
    assert data.metrics["frac_reward_zero_std"] == pytest.approx(3 / 6)
    assert data.metrics["time/scoring"] == pytest.approx(0.5)
    # without a selection every group trains, with the old single-round semantics
    alone = assemble_step([first], None, build_demo_tokenizer(), 3, "group", step=0)
    assert alone.prompt_rows == [10, 11, 12] and len(alone.completion_ids) == 9
    assert alone.advantages_n[:3].tolist() == [0.0] * 3
    assert math.isclose(alone.metrics["reward"], 11 / 9)


def test_scores_of_several_rounds_concatenate():
    a = _round([[1, 0]], rows=[0], prompt_base=0).scores
    b = _round([[2, 2], [3, 1]], rows=[1, 2], prompt_base=0).scores
    b.restarts, b.error_messages = 2, ["accuracy_reward on sample 1: boom"]
    both = RewardScores.concat([a, b])
    assert both.rewards_nk.flatten().tolist() == [1, 0, 2, 2, 3, 1]
    assert both.status_nk.shape == (6, 1) and both.names == ["accuracy_reward"]
    assert (both.seconds, both.restarts, both.error_messages) == (1.0, 2, b.error_messages)
    assert RewardScores.concat([a]) is a
    other = RewardScores(a.rewards_nk, a.status_nk, ["format_reward"], a.weights_k)
    with pytest.raises(ValueError, match="scores of different functions"):
        RewardScores.concat([a, other])
