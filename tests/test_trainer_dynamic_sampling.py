"""Dynamic sampling end to end on the embedded demo (transformers engine, reward pool, megatron
policy): zero-std groups are dropped, further rounds fill the batch from new prompts, the bound
cuts it short, and the trained batch, its advantages and the logged metrics are the ones the
prompts' rewards imply; the same with async rollouts.

The reward (``_reward_fns.signal_when_divisible_by_3``) gives a group a spread exactly when its
prompt's solution is a multiple of 3, so which groups are kept follows from the data alone and the
test predicts every step without looking at what the run did. The demo's batch is 8 groups of 8
completions in micro-batches of 16 (2 groups): a batch cut short at the bound is a multiple of 2.
"""

from __future__ import annotations

import pytest
import torch
from _multiproc import run_ranks
from _train_workers import batch_recording_demo_worker

from megagrpo.algorithms.advantages import group_advantages
from megagrpo.data.sampler import GenerationRounds, PromptSampler
from megagrpo.demo.grpo_demo import prepare_demo

GROUPS, G, ROUNDS, STEPS = 8, 8, 3, 4
RECIPE = [
    "--max_steps", str(STEPS),
    "--save_strategy", "no",
    "--eval_strategy", "no",
    "--log_completions", "false",
    "--reward_funcs", "_reward_fns:signal_when_divisible_by_3",
    "--reward_weights", "1.0",
    "--dynamic_sampling", "true",
    "--max_generation_rounds", str(ROUNDS),
]  # fmt: skip


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("demo"))
    prepare_demo(d)
    return d


def _expected(solutions, step):
    """(kept prompt rows, rounds, filtered, surplus) of ``step``, from the data alone."""
    rounds = GenerationRounds(PromptSampler(len(solutions), GROUPS, seed=42), ROUNDS)
    signal, silent, r = [], 0, 0
    while r < ROUNDS and len(signal) < GROUPS:
        for row in rounds.rows_at(step, r):
            if int(solutions[row]) % 3 == 0:
                signal.append(row)
            else:
                silent += 1
        r += 1
    size = GROUPS if len(signal) >= GROUPS else len(signal) // 2 * 2
    return signal[:size], r, silent, len(signal) - size


def _run(demo_dir, out, extra=()):
    results = run_ranks(1, batch_recording_demo_worker, demo_dir, out, RECIPE + list(extra))
    return next(r for r in results if r is not None)


def _check(history, steps, solutions):
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))
    seen = set()
    for step, (h, s) in enumerate(zip(history, steps)):
        kept, rounds, filtered, surplus = _expected(solutions, step)
        seen.add((rounds, len(kept) == GROUPS))
        assert s["prompt_rows"] == kept, step
        assert s["completions"] == s["trained"] == G * len(kept)  # what the update trained on
        assert h["dynamic_sampling/rounds"] == rounds
        assert h["dynamic_sampling/filtered_groups"] == filtered
        assert h["dynamic_sampling/kept_groups"] == len(kept)
        assert h["dynamic_sampling/surplus_groups"] == surplus
        assert h["dynamic_sampling/padded_groups"] == 0
        # every trained group has a spread, and its advantages are over the kept batch alone
        r_bg = torch.tensor(s["rewards_n"], dtype=torch.float64).view(-1, G)
        assert bool((r_bg.std(dim=1) > 0).all())
        expected = group_advantages(r_bg.flatten().float(), G, "group").advantages_n
        assert s["advantages_n"] == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-6)
        # the logged reward metrics describe everything generated: zero-std groups included
        assert h["frac_reward_zero_std"] == pytest.approx(filtered / (rounds * GROUPS))
    # the run met each case: cut short at the bound, full at the bound, full before it
    assert {(3, False), (3, True), (2, True)} <= seen, seen


def test_dynamic_sampling_fills_the_batch_from_new_prompts(demo_dir, tmp_path):
    history, steps, solutions = _run(demo_dir, str(tmp_path / "sync"))
    _check(history, steps, solutions)


def test_dynamic_sampling_with_async_rollouts(demo_dir, tmp_path):
    history, steps, solutions = _run(
        demo_dir, str(tmp_path / "async"), ["--async_max_staleness", "1"]
    )
    _check(history, steps, solutions)  # the same prompts and groups as a synchronous run
    assert max(h["rollout/staleness"] for h in history) <= 1
    assert any(h["rollout/staleness"] == 1 for h in history)  # a first round overlapped
